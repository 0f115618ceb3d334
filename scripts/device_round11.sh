#!/usr/bin/env bash
# One device call (2026-12-07, issue 21): the shared-prefix kernel at 64-key tiles (FP8 tiles
# of 128 spilled registers): its GPU tests, then the engine alone on the spike workload, bf16
# KV vs FP8 KV + shared-prefix attention, side by side.
# carry: [".cache/tok-smollm2", ".whl"] (see device_round10.sh).
set -uo pipefail
OUT=${OUT:-/tmp/chatq-round11}
source "$(dirname "$0")/device_env.sh"  # the carried wheels, PYTHONPATH, $OUT
t0=$(date +%s)
el() { echo "$(($(date +%s) - t0))s"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
echo "== GPU tests $(el)"
timeout 120 python3 -m pytest -q -p no:cacheprovider -o addopts="" \
  tests/gpu_engine/test_shared_prefix.py 2>&1 | grep -E "passed|failed|FAILED|Error" | tail -6
for mode in ${ALONE_MODES:-base fp8 shared}; do
  echo "== engine alone, spike workload, $mode $(el)"
  case $mode in
    base) flag=() ;;
    fp8) flag=(--kv-cache-dtype fp8 --shared-prefix) ;;
    shared) flag=(--shared-prefix) ;;
  esac
  timeout "${ALONE_S:-110}" python3 bench/spike.py --out /tmp/spike-ab --tokenizer .cache/tok-smollm2 \
    --alone-requests "${ALONE_REQUESTS:-512}" --alone-json "$OUT/alone_$mode.json" "${flag[@]}" \
    > "$OUT/alone_$mode.log" 2>&1 || tail -5 "$OUT/alone_$mode.log"
done
python3 scripts/alone_table.py "$OUT"
echo "== done $(el)"
