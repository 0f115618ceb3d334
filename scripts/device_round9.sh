#!/usr/bin/env bash
# One device call (2026-12-07, issues 21 and 22), each part under its own limit:
#   flash-attn's build starts in the background (~80 s) while the FP8 / shared-prefix GPU
#   tests run (untimed); then, with the host idle: Qwen2.5-7B at batch 1 (bf16, FP8
#   projections, FP8 projections + LM head; the GEMV launch tuned per shape at load),
#   nano-vllm's shape with the bf16 vs FP8 KV cache, the decode kernels (FP8 tiles as fp16
#   vs bf16 dot operands), and bench/attention_race.py in what time is left.
# carry: [".whl-flash"] (scripts/flash_attn_sdist.sh).
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
t0=$(date +%s)
el() { echo "$(($(date +%s) - t0))s"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
echo "commit ${COMMIT:-unknown}"
WAIT_S=1 bash scripts/device_flash_attn.sh build >/dev/null 2>&1
echo "== GPU tests $(el)"
timeout "${TESTS_S:-150}" python3 -m pytest -q -p no:cacheprovider -o addopts="" \
  tests/gpu_engine/test_fp8_kv.py tests/gpu_engine/test_fp8_linear.py \
  tests/gpu_engine/test_shared_prefix.py -k "not tensor_par" 2>&1 | grep -E "passed|failed|FAILED|Error" | tail -12
echo "== flash-attn build $(el)"
WAIT_S=200 bash scripts/device_flash_attn.sh wait 2>&1 | grep -v WARNING
echo "== 7B batch 1 $(el)"
timeout 200 python3 bench/engine_throughput.py --hf-requests 0 --skip-chatq \
  --quantizations none,fp8,fp8-lm-head --batches 1 2>&1 | grep -E "^\| \(b\)|Error" | head
echo "== nano-vllm shape, KV bf16 vs fp8 $(el)"
timeout 150 python3 bench/engine_throughput.py --hf-requests 0 --skip-roofline \
  --kv-cache-dtypes auto,fp8 2>&1 | grep -E "^\| \(a\)|Error" | grep -v "host ms" | head
echo "== decode kernels $(el)"
timeout 90 python3 bench/fp8_kernels.py --parts decode 2>&1 | grep -E "^\| decode|Error"
left=$((570 - $(date +%s) + t0))
echo "== attention race ($left s) $(el)"
PYTHONPATH=/tmp/chatq-flash/site:$PWD timeout "$left" python3 bench/attention_race.py \
  --parts "${RACE_PARTS:-prefill,decode}" 2>&1 | grep -E "^\| (decode|prefill)|Error"
echo "== done $(el)"
