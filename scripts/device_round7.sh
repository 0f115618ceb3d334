#!/usr/bin/env bash
# One device call (2026-12-07), most important first, each part under its own time limit:
#   1. issue 21's batch-1 FP8 GEMV sweep (wide x loads, per-step sums for large tiles,
#      8 warps) and the Qwen2.5-7B shape at batch 1, bf16 vs FP8 weights (host idle);
#   2. issue 22: flash-attn's build starts in the background (scripts/device_flash_attn.sh;
#      a next call right after this one, "bash scripts/device_flash_attn.sh wait test",
#      finds it while the machine is held);
#   3. every gpu-marked test (keyed sampling is CUDA's default since c9c3afe), beside the build.
# carry: [".whl-structured", ".cache/tok-smollm2", ".whl-flash"].
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site-st .whl-structured/*.whl >/dev/null 2>&1 || exit 1
export PYTHONPATH=/tmp/site-st:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
t0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
skip='leaked|skipped remainder|nanobind|refleaks'
echo "== gemv $(($(date +%s) - t0))s"
timeout "${T1:-120}" python3 bench/fp8_kernels.py --parts gemv 2>&1 | tail -26
echo "== 7B batch 1 $(($(date +%s) - t0))s"
timeout "${T2:-110}" python3 bench/engine_throughput.py --hf-requests 0 --skip-chatq \
  --quantizations none,fp8 --batches 1 2>&1 | grep -E "^\| \(b\)|Error" | head
if [ -d .whl-flash ] && [ "${T3:-1}" != 0 ]; then
  echo "== flash-attn build $(($(date +%s) - t0))s"
  WAIT_S=1 bash scripts/device_flash_attn.sh build 2>&1 | tail -3
fi
echo "== all gpu tests $(($(date +%s) - t0))s"
timeout "${T4:-330}" python3 -m pytest -q -rs -p no:cacheprovider -o addopts="" -m gpu \
  --continue-on-collection-errors tests \
  2>&1 | grep -v -E "$skip" | grep -E "^(FAILED|ERROR|SKIPPED)|passed|failed|error" | tail -25
echo "== flash-attn build log $(($(date +%s) - t0))s"
tail -c 600 /tmp/chatq-flash/build.log 2>/dev/null
echo "== done $(($(date +%s) - t0))s"
