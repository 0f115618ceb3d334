#!/usr/bin/env bash
# One GPU-machine call that checks what a round of CPU work changed: the engine benchmark's
# step timer on CUDA (issue 14), every `gpu`-marked test (issue 23), and the gateway benchmark
# on the 16-core host (issue 15). Prepare here first (bash scripts/gateway_wheels.sh), then run
# with `carry: [".whl-gateway", ".bin"]`:
#   bash scripts/device_session.sh [engine] [gateway] [tests]
# Each part has its own time limit so one slow part cannot cost the others; logs land in $OUT
# and a short table prints last.
set -uo pipefail
OUT=${OUT:-/tmp/chatq-session-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site-gw .whl-gateway/*.whl || exit 1
export PYTHONPATH=/tmp/site-gw:$PWD
export CHATQ_REDIS_SERVER=$PWD/.bin/valkey-server
parts=("$@")
[[ ${#parts[@]} -eq 0 ]] && parts=(engine gateway tests)
want() { [[ " ${parts[*]} " == *" $1 "* ]]; }
t0=$(date +%s)
summary=()
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv | tee "$OUT/gpu.txt"
nproc | tee -a "$OUT/gpu.txt"

if want engine; then
  echo "== engine_throughput (smoke on cuda, then nano-vllm shape) $(($(date +%s) - t0))s"
  timeout 45 python3 bench/engine_throughput.py --smoke > "$OUT/engine_smoke.log" 2>&1
  summary+=("engine smoke on cuda: rc $?")
  timeout 80 python3 bench/engine_throughput.py --hf-requests 0 --skip-roofline \
    --out "$OUT/eng" > "$OUT/engine.log" 2>&1
  summary+=("engine nano-vllm shape: rc $?")
  grep -E "tok/s|host ms/step|graph_stage|wait" "$OUT/engine.log" | tail -12
fi

if want gateway; then
  echo "== gateway bench $(($(date +%s) - t0))s"
  timeout 140 python3 bench/gateway.py --latency-requests 1500 --gateway-processes 1,4 \
    --load-processes 6 --connections 64 --seconds 6 --worker-host-processes 2 \
    > "$OUT/gateway.log" 2>&1
  summary+=("gateway bench: rc $?")
  tail -24 "$OUT/gateway.log"
fi

if want tests; then
  echo "== pytest -m gpu $(($(date +%s) - t0))s"
  timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -o addopts="" \
    tests/gpu_engine/test_kernels.py tests/gpu_engine/test_gpu_engine.py \
    tests/gpu_engine/test_fp8_kv.py tests/gpu_engine/test_fp8_linear.py \
    tests/gpu_engine/test_shared_prefix.py tests/gpu_engine/test_tensor_parallel.py \
    tests/workers/test_metrics.py > "$OUT/pytest_gpu.log" 2>&1
  summary+=("pytest -m gpu: rc $? ($(grep -E 'passed|failed' "$OUT/pytest_gpu.log" | tail -1))")
  grep -E "^(FAILED|ERROR)" "$OUT/pytest_gpu.log" | head -20
fi

echo "== done in $(($(date +%s) - t0))s"
printf '%s\n' "${summary[@]}"
