#!/usr/bin/env bash
# One device call (2026-12-07): every gpu-marked test (keyed sampling is CUDA's default
# since c9c3afe), then issue 21's batch-1 FP8 GEMV sweep (wide x loads, per-step sums for
# large tiles, 8 warps) and the Qwen2.5-7B shape at batch 1, bf16 vs FP8 weights.
# carry: [".whl-structured", ".cache/tok-smollm2"] (scripts/structured_wheels.sh).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site-st .whl-structured/*.whl >/dev/null 2>&1 || exit 1
export PYTHONPATH=/tmp/site-st:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
t0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
skip='leaked|skipped remainder|nanobind|refleaks'
echo "== all gpu tests $(($(date +%s) - t0))s"
timeout "${T1:-330}" python3 -m pytest -q -rs -p no:cacheprovider -o addopts="" -m gpu tests \
  2>&1 | grep -v -E "$skip" | grep -E "^(FAILED|ERROR|SKIPPED)|passed|failed|error" | tail -25
echo "== gemv $(($(date +%s) - t0))s"
timeout "${T2:-120}" python3 bench/fp8_kernels.py --parts gemv 2>&1 | tail -26
echo "== 7B batch 1 $(($(date +%s) - t0))s"
timeout "${T3:-110}" python3 bench/engine_throughput.py --hf-requests 0 --skip-chatq \
  --quantizations none,fp8 --batches 1 2>&1 | grep -E "^\| \(b\)|Error" | head
echo "== done $(($(date +%s) - t0))s"
