#!/usr/bin/env bash
# Issue 21 on the GPU machine: FP8 KV cache, FP8 weights, shared-prefix attention. Run from
# the repo root with `carry` holding .whl (redis, hiredis, PyJWT wheels), .bin/valkey-server
# and .cache/tok-smollm2 (see device_env.sh):
#   scripts/device_fp8.sh [tests] [kernels] [engine] [alone] [spike] -- [bench/spike.py args]
#     tests    GPU pytest: the FP8 / shared-prefix kernels and engine paths, plus the kernel
#              and graph-parity tests they touch
#     kernels  bench/fp8_kernels.py (decode attention bf16 vs FP8; FP8 vs bf16 linears)
#     engine   bench/engine_throughput.py: (a) KV auto vs fp8, (b) weights none/fp8/fp8+kv
#     alone    engine alone on the spike workload: ALONE_MODES (default: base = bf16 KV,
#              no shared prefix; shared = bf16 KV + shared prefix; fp8 = FP8 KV + shared)
#     spike    bench/spike.py through Redis with FP8 KV + shared prefix (shortened burst)
# Logs under $OUT; a short table prints last.
set -uo pipefail
OUT=${OUT:-/tmp/chatq-fp8-out}
source "$(dirname "$0")/device_env.sh"
parts=()
while [[ $# -gt 0 && "$1" != "--" ]]; do parts+=("$1"); shift; done
[[ "${1:-}" == "--" ]] && shift
[[ ${#parts[@]} -eq 0 ]] && parts=(tests kernels engine)
want() { [[ " ${parts[*]} " == *" $1 "* ]]; }
t0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv | tee "$OUT/gpu.txt"
echo "commit ${COMMIT:-unknown}" | tee -a "$OUT/gpu.txt"
if want tests; then
  echo "== pytest (GPU) $(($(date +%s) - t0))s"
  timeout "${TESTS_TIMEOUT_S:-300}" python3 -m pytest -q -p no:cacheprovider -o addopts="" \
    tests/gpu_engine/test_fp8_kv.py tests/gpu_engine/test_fp8_linear.py \
    tests/gpu_engine/test_shared_prefix.py ${EXTRA_TESTS:-tests/gpu_engine/test_gpu_engine.py \
    tests/gpu_engine/test_kernels.py} -k "${TESTS_K:-not tensor_par}" 2>&1 \
    | tee "$OUT/pytest_gpu.log" | tail -15
fi
if want kernels; then
  echo "== fp8_kernels $(($(date +%s) - t0))s"
  timeout 180 python3 bench/fp8_kernels.py 2>&1 | tee "$OUT/fp8_kernels.log" | tail -30
fi
if want engine; then
  echo "== engine_throughput $(($(date +%s) - t0))s"
  timeout 420 python3 bench/engine_throughput.py --hf-requests 0 --out "$OUT" \
    --kv-cache-dtypes auto,fp8 --quantizations none,fp8,fp8+kv --batches "${BATCHES:-1,8}" \
    2>&1 | tee "$OUT/engine_throughput.log" | grep -v "^\[" | tail -20
fi
if want alone; then
  for mode in ${ALONE_MODES:-base fp8}; do
    echo "== engine alone, spike workload, $mode $(($(date +%s) - t0))s"
    case $mode in
      base) flag=() ;;
      shared) flag=(--shared-prefix) ;;
      fp8) flag=(--kv-cache-dtype fp8 --shared-prefix) ;;
      fp8-noshare) flag=(--kv-cache-dtype fp8) ;;
    esac
    timeout 240 python3 bench/spike.py --out /tmp/spike-ab --tokenizer .cache/tok-smollm2 \
      --alone-requests "${ALONE_REQUESTS:-1024}" --alone-json "$OUT/alone_$mode.json" "${flag[@]}" \
      > "$OUT/alone_$mode.log" 2>&1 || tail -20 "$OUT/alone_$mode.log"
  done
fi
if want spike; then
  echo "== spike (FP8 KV + shared prefix) $(($(date +%s) - t0))s"
  timeout "${SPIKE_TIMEOUT_S:-400}" python3 bench/spike.py --out "$OUT/spike" \
    --tokenizer .cache/tok-smollm2 --kv-cache-dtype fp8 --shared-prefix "$@" 2>&1 | tee "$OUT/spike.log" | tail -30
  cp "$OUT/spike/spike.json" "$OUT/spike/spike.png" "$OUT/spike/worker.log" "$OUT/" 2>/dev/null
  rm -rf "$OUT/spike"
fi
echo "== summary $(($(date +%s) - t0))s"
grep -E "passed|failed|error" "$OUT/pytest_gpu.log" 2>/dev/null | tail -2
grep -E "^\| (decode|qkv|o |gate_up|down)" "$OUT/fp8_kernels.log" 2>/dev/null | head -30
grep -E "^\| \((a|b)\)" "$OUT/engine_throughput.md" 2>/dev/null | grep -v "host ms"
python3 scripts/alone_table.py "$OUT"
echo "== done in $(($(date +%s) - t0))s"
