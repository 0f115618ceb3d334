#!/usr/bin/env bash
# For the device session of 2026-12-07/08 (issue 21): why the FP8 decode kernel's 64-key
# tiles win alone (1.39-1.40x the bf16 kernel at nano-vllm's shape) and lose in the engine
# (1.12x against 1.22x at 128 keys, two calls apart): the same run, side by side, with the
# tile width as an env knob (CHATQ_FP8_KV_TILE, kernels/__init__.py).
#   bash scripts/device_round16.sh nano     decode kernels beside bf16; nano-vllm's shape with
#                                           bf16 KV, FP8 KV at 128-key tiles, FP8 KV at 64
# carry: none.
set -uo pipefail
OUT=${OUT:-/tmp/chatq-round16}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
t0=$(date +%s)
el() { echo "$(($(date +%s) - t0))s"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
if [[ " $* " == *" nano "* ]]; then
  echo "== decode kernels $(el)"
  timeout 100 python3 bench/fp8_kernels.py --parts decode 2>&1 | grep -E "^\| decode|Error"
  echo "== nano-vllm shape, KV bf16 vs fp8 (128-key tiles) $(el)"
  timeout 150 python3 bench/engine_throughput.py --hf-requests 0 --skip-roofline \
    --kv-cache-dtypes auto,fp8 2>&1 | grep -E "^\| \(a\)|Error"
  echo "== nano-vllm shape, KV fp8, CHATQ_FP8_KV_TILE=64 $(el)"
  CHATQ_FP8_KV_TILE=64 timeout 100 python3 bench/engine_throughput.py --hf-requests 0 \
    --skip-roofline --kv-cache-dtypes fp8 2>&1 | grep -E "^\| \(a\)|Error"
fi
echo "== done $(el)"
