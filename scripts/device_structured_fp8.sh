#!/usr/bin/env bash
# One device call for issues 19 and 21 (run on 2026-12-07 under the name device_session.sh),
# most important first, each part under its own time limit so a short lease still brings
# back the first ones:
#   1. bench/structured.py --phases (issue 19: constrained vs free, host ms per step);
#   2. bench/fp8_kernels.py --parts gemv (issue 21: the split-K batch-1 FP8 kernel sweep);
#   3. the GPU tests of the FP8 store bytes, the GEMV and the fused small-M kernel;
#   4. bench/engine_throughput.py, Qwen2.5-7B shape at batch 1, bf16 vs FP8 weights.
# carry: [".whl-structured", ".cache/tok-smollm2"] (scripts/structured_wheels.sh).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site-st .whl-structured/*.whl || exit 1
export PYTHONPATH=/tmp/site-st:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
t0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
echo "== structured $(($(date +%s) - t0))s"
timeout "${T1:-200}" python3 bench/structured.py --out /tmp/chatq-st --tokenizer .cache/tok-smollm2 \
  --batch 64 --requests 256 --max-tokens 256 --rounds 3 --phases 2>&1 \
  | grep -v -E "leaked|skipped remainder|nanobind|refleaks" | tail -18
echo "== gemv $(($(date +%s) - t0))s"
timeout "${T2:-120}" python3 bench/fp8_kernels.py --parts gemv 2>&1 | tail -22
echo "== fp8 tests $(($(date +%s) - t0))s"
timeout "${T3:-90}" python3 -m pytest -q -p no:cacheprovider -o addopts="" -m gpu \
  tests/gpu_engine/test_fp8_kv.py tests/gpu_engine/test_fp8_linear.py \
  -k "triton_backend_fp8 or gemv or fused" 2>&1 | grep -E "^E  |passed|failed" | head -12
echo "== 7B batch 1 $(($(date +%s) - t0))s"
timeout "${T4:-200}" python3 bench/engine_throughput.py --hf-requests 0 --skip-chatq \
  --quantizations none,fp8 --batches 1 2>&1 | grep -E "^\| \(b\)|Error" | head
echo "== done $(($(date +%s) - t0))s"
