#!/usr/bin/env bash
# One device call: every gpu-marked test, kernel micro-benchmarks, the engine benchmark.
# Logs and JSON land under $OUT (the device tool brings them back); a short table prints last.
#   scripts/gpu_check.sh [tests] [kernels] [engine] -- [engine_throughput.py args]
set -uo pipefail
OUT=${OUT:-/tmp/chatq-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
parts=()
while [[ $# -gt 0 && "$1" != "--" ]]; do parts+=("$1"); shift; done
[[ "${1:-}" == "--" ]] && shift
[[ ${#parts[@]} -eq 0 ]] && parts=(tests kernels engine)
want() { [[ " ${parts[*]} " == *" $1 "* ]]; }
t0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.mem \
  --format=csv 2>&1 | tee "$OUT/nvidia_smi.txt"
$PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', \
triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())" \
  2>&1 | tee -a "$OUT/nvidia_smi.txt"
if want tests; then
  echo "== pytest (GPU) $(($(date +%s) - t0))s"
  # Every gpu-marked test of the suite (kernels, engine, FP8, shared prefix, metrics, and
  # the tensor-parallel ones: those need 2 devices and say so when skipped on one; run this
  # on kind nvidia-h100-x2 to include them), plus the flash-attn wiring tests.
  timeout 420 $PY -m pytest -q -rs -p no:cacheprovider -o addopts="" -m gpu tests \
    2>&1 | tee "$OUT/pytest_gpu.log" | tail -25
  timeout 120 $PY -m pytest -q -p no:cacheprovider -o addopts="" \
    tests/gpu_engine/test_flash_attn.py 2>&1 | tee -a "$OUT/pytest_gpu.log" | tail -3
fi
if want kernels; then
  echo "== kernel_bench $(($(date +%s) - t0))s"
  timeout 240 $PY bench/kernel_bench.py ${KERNEL_BENCH_ARGS:-} 2>&1 | tee "$OUT/kernel_bench.log"
fi
if want engine; then
  echo "== engine_throughput $(($(date +%s) - t0))s"
  timeout 540 $PY bench/engine_throughput.py --out "$OUT" "$@" 2>&1 \
    | tee "$OUT/engine_throughput.log" | grep -v "^\[" | tail -40
fi
echo "== done in $(($(date +%s) - t0))s"
grep -E "passed|failed|error" "$OUT/pytest_gpu.log" 2>/dev/null | tail -3
