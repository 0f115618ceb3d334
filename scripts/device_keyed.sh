#!/usr/bin/env bash
# One device call for issue 19's keyed sampling and issue 21's GEMV prefetch (first run
# 2026-12-07), most important first, each part under its own time limit so a short lease
# still brings back the first ones:
#   1. bench/structured.py --phases: constrained vs free tokens/s, host ms per step; then the
#      same without keyed sampling (CHATQ_KEYED_SAMPLING=0: the generators and torch ops);
#   2. the gpu-marked tests of the sampler, grammars, engine and FP8 linears (keyed draws and
#      the fused sampling kernel are CUDA's default);
#   3. bench/fp8_kernels.py --parts gemv: the batch-1 FP8 GEMV with and without prefetch;
#   4. bench/engine_throughput.py, Qwen2.5-7B shape at batch 1: bf16 vs FP8 weights, then FP8
#      with the prefetching GEMV (CHATQ_FP8_GEMV_PREFETCH=1), in the same call;
#   5. every gpu-marked test of the suite (the summary line and failures only).
# carry: [".whl-structured", ".cache/tok-smollm2"] (scripts/structured_wheels.sh).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site-st .whl-structured/*.whl || exit 1
export PYTHONPATH=/tmp/site-st:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
t0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
echo "== structured $(($(date +%s) - t0))s"
timeout "${T1:-150}" python3 bench/structured.py --out /tmp/chatq-st --tokenizer .cache/tok-smollm2 \
  --batch 64 --requests 256 --max-tokens 256 --rounds 3 --phases 2>&1 \
  | grep -v -E "leaked|skipped remainder|nanobind|refleaks" | tail -18
echo "== structured, generators (CHATQ_KEYED_SAMPLING=0) $(($(date +%s) - t0))s"
CHATQ_KEYED_SAMPLING=0 timeout "${T1B:-120}" python3 bench/structured.py --out /tmp/chatq-st \
  --tokenizer .cache/tok-smollm2 --batch 64 --requests 256 --max-tokens 256 --rounds 3 \
  2>&1 | grep -E "^(mode|free|json)"
echo "== sampler tests $(($(date +%s) - t0))s"
timeout "${T2:-120}" python3 -m pytest -q -p no:cacheprovider -o addopts="" -m gpu \
  tests/gpu_engine/test_sampling.py tests/gpu_engine/test_grammar.py \
  tests/gpu_engine/test_engine.py tests/gpu_engine/test_fp8_linear.py 2>&1 \
  | grep -E "^E  |^FAILED|passed|failed" | head -20
echo "== gemv $(($(date +%s) - t0))s"
timeout "${T3:-100}" python3 bench/fp8_kernels.py --parts gemv 2>&1 | tail -22
echo "== 7B batch 1 $(($(date +%s) - t0))s"
timeout "${T4:-150}" python3 bench/engine_throughput.py --hf-requests 0 --skip-chatq \
  --quantizations none,fp8 --batches 1 2>&1 | grep -E "^\| \(b\)|Error" | head
echo "== 7B batch 1, prefetching GEMV $(($(date +%s) - t0))s"
CHATQ_FP8_GEMV_PREFETCH=1 timeout "${T5:-100}" python3 bench/engine_throughput.py \
  --hf-requests 0 --skip-chatq --quantizations fp8 --batches 1 2>&1 \
  | grep -E "^\| \(b\)|Error" | head
echo "== all gpu tests $(($(date +%s) - t0))s"
timeout "${T6:-150}" python3 -m pytest -q -p no:cacheprovider -o addopts="" -m gpu tests \
  2>&1 | grep -E "^FAILED|passed|failed" | head -20
echo "== done $(($(date +%s) - t0))s"
