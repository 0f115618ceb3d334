#!/usr/bin/env bash
# One device call (2026-12-07, issues 21 and 22): flash-attn's build starts in the background
# while the FP8 tiny-V kernel tests run; then bench/attention_race.py timed as CUDA-graph
# replays (device time; the first race timed Python's launches at small shapes), and the
# engine alone on the spike workload (bench/spike.py's shape): bf16 KV, FP8 KV, FP8 KV with
# shared-prefix attention, side by side.
# carry: [".whl-flash", ".cache/tok-smollm2", ".whl"] (scripts/flash_attn_sdist.sh; the
# tokenizer is the embedded SmolLM2's, saved as in scripts/structured_wheels.sh; .whl: the
# redis client wheels bench/spike.py imports, `pip download --no-deps redis hiredis PyJWT`).
set -uo pipefail
OUT=${OUT:-/tmp/chatq-round10}
source "$(dirname "$0")/device_env.sh"  # the carried wheels, PYTHONPATH, $OUT
t0=$(date +%s)
el() { echo "$(($(date +%s) - t0))s"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
echo "commit ${COMMIT:-unknown}"
WAIT_S=1 bash scripts/device_flash_attn.sh build >/dev/null 2>&1
echo "== GPU tests $(el)"
timeout 90 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/gpu_engine/test_fp8_kv.py \
  -k "tiny or fp8_gpu" 2>&1 | grep -E "passed|failed|FAILED|Error" | tail -6
echo "== flash-attn build $(el)"
WAIT_S=200 bash scripts/device_flash_attn.sh wait 2>&1 | grep -v WARNING
echo "== attention race, graph replays $(el)"
PYTHONPATH=/tmp/chatq-flash/site:$PYTHONPATH timeout "${RACE_S:-200}" python3 bench/attention_race.py \
  --parts "${RACE_PARTS:-decode,prefill}" 2>&1 | grep -E "^\| (decode|prefill)|Error"
for mode in ${ALONE_MODES:-base fp8-noshare fp8}; do
  echo "== engine alone, spike workload, $mode $(el)"
  case $mode in
    base) flag=() ;;
    fp8-noshare) flag=(--kv-cache-dtype fp8) ;;
    fp8) flag=(--kv-cache-dtype fp8 --shared-prefix) ;;
  esac
  timeout "${ALONE_S:-110}" python3 bench/spike.py --out /tmp/spike-ab --tokenizer .cache/tok-smollm2 \
    --alone-requests "${ALONE_REQUESTS:-512}" --alone-json "$OUT/alone_$mode.json" "${flag[@]}" \
    > "$OUT/alone_$mode.log" 2>&1 || tail -5 "$OUT/alone_$mode.log"
done
python3 scripts/alone_table.py "$OUT"
echo "== done $(el)"
