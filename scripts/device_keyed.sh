#!/usr/bin/env bash
# One device call for issue 19's keyed sampling (first run 2026-12-07), most important first,
# each part under its own time limit so a short lease still brings back the first ones:
#   1. bench/structured.py --phases: constrained vs free tokens/s, host ms per step;
#   2. the gpu-marked tests of the sampler, grammars and engine (keyed draws and the fused
#      sampling kernel are CUDA's default);
#   3. every gpu-marked test of the suite (the summary line and failures only).
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
echo "== sampler tests $(($(date +%s) - t0))s"
timeout "${T2:-150}" python3 -m pytest -q -p no:cacheprovider -o addopts="" -m gpu \
  tests/gpu_engine/test_sampling.py tests/gpu_engine/test_grammar.py \
  tests/gpu_engine/test_engine.py 2>&1 | grep -E "^E  |^FAILED|passed|failed" | head -20
echo "== all gpu tests $(($(date +%s) - t0))s"
timeout "${T3:-300}" python3 -m pytest -q -p no:cacheprovider -o addopts="" -m gpu tests \
  2>&1 | grep -E "^FAILED|passed|failed" | head -20
echo "== done $(($(date +%s) - t0))s"
