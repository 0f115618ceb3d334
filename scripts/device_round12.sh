#!/usr/bin/env bash
# For the next device session (written 2026-12-07, issue 21): the FP8 decode kernel reading
# its tiles in two halves of the head dim (CHATQ_FP8_KV_HALVES=1: 133 registers a thread
# instead of 193 in the sm_90 compile, not yet run on a GPU). Its GPU tests, the decode
# kernels side by side (bench/fp8_kernels.py --parts decode has a halves row and the spike's
# shared-prefix shape), then nano-vllm's shape with the bf16 and FP8 caches, halves off and
# on, and at 8 warps a program (CHATQ_FP8_KV_WARPS=8: 147/103 registers instead of 195/136).
# If one wins, make it the default (gpu_engine/kernels/decode_attention.py). Last,
# our decode at every split count for 1-8 sequences of 512/2k tokens (flash-attn was
# 1.14-1.24x ahead there): is choose_num_splits' 4-tiles-a-split rule the cost?
# carry: none.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
t0=$(date +%s)
el() { echo "$(($(date +%s) - t0))s"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
echo "== GPU tests $(el)"
timeout 150 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/gpu_engine/test_fp8_kv.py \
  2>&1 | grep -E "passed|failed|FAILED|Error" | tail -8
echo "== decode kernels $(el)"
timeout 120 python3 bench/fp8_kernels.py --parts decode 2>&1 | grep -E "^\| decode|Error"
echo "== nano-vllm shape, KV bf16 vs fp8 $(el)"
timeout 150 python3 bench/engine_throughput.py --hf-requests 0 --skip-roofline \
  --kv-cache-dtypes auto,fp8 2>&1 | grep -E "^\| \(a\)|Error" | grep -v "host ms"
for variant in "1 4" "0 8" "1 8"; do
  set -- $variant
  echo "== nano-vllm shape, KV fp8, CHATQ_FP8_KV_HALVES=$1 CHATQ_FP8_KV_WARPS=$2 $(el)"
  CHATQ_FP8_KV_HALVES=$1 CHATQ_FP8_KV_WARPS=$2 timeout 120 python3 bench/engine_throughput.py \
    --hf-requests 0 --skip-roofline --kv-cache-dtypes fp8 2>&1 | grep -E "^\| \(a\)|Error" \
    | grep -v "host ms"
done
echo "== decode split counts at small batches (ours alone) $(el)"
timeout 90 python3 bench/attention_race.py --parts splits 2>&1 | grep -E "^\| splits|Error"
echo "== done $(el)"
