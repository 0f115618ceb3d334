#!/usr/bin/env bash
# Issue 19 items 2 and 4 on the GPU: the sampling and structured-output tests on CUDA
# (gpu-marked: CUDA against the CPU reference), then bench/structured.py — a batch of 64
# constrained (JSON schema) requests vs the same work unconstrained, side by side in one
# engine (target: at most 5% fewer tokens/s). Prepare here with
# `bash scripts/structured_wheels.sh`, then run with
# `carry: [".whl-structured", ".cache/tok-smollm2"]`:
#   bash scripts/device_structured.sh [tests] [bench]
set -uo pipefail
OUT=${OUT:-/tmp/chatq-structured-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site-st .whl-structured/*.whl || exit 1
export PYTHONPATH=/tmp/site-st:$PWD
parts=("$@")
[[ ${#parts[@]} -eq 0 ]] && parts=(tests bench)
want() { [[ " ${parts[*]} " == *" $1 "* ]]; }
t0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import xgrammar, torch; print('xgrammar ok, torch', torch.__version__)" || exit 1
if want tests; then
  echo "== pytest -m gpu (sampling, grammar) $(($(date +%s) - t0))s"
  timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -o addopts="" \
    tests/gpu_engine/test_sampling.py tests/gpu_engine/test_grammar.py 2>&1 \
    | tee "$OUT/pytest_gpu.log" | tail -22
fi
if want bench; then
  echo "== bench/structured.py $(($(date +%s) - t0))s"
  timeout 60 python3 bench/structured.py --smoke --device cuda > "$OUT/smoke.log" 2>&1
  echo "smoke on cuda: rc $?"
  timeout 330 python3 bench/structured.py --out /tmp/chatq-st --tokenizer .cache/tok-smollm2 \
    --batch 64 --requests 256 --max-tokens 256 --rounds 3 --phases 2>&1 | tee "$OUT/structured.log" \
    | grep -v -E "leaked|skipped remainder|nanobind" | tail -22
fi
echo "== done in $(($(date +%s) - t0))s"
