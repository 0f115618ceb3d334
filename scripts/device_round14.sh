#!/usr/bin/env bash
# For the next device session (written 2026-12-07, issue 21): an FP8 cache stores V
# page-major ([blocks, KV heads, head_dim, page]: gpu_engine.fp8, kernels.kv_tiles), so a V
# tile reaches the P·V dot with 4-byte shared-memory reads instead of one read per byte; the
# sm_90 compile of the FP8 decode kernel needs 126 registers a thread instead of 195 (prefill
# M16 130 instead of 228; the shared-prefix kernel no longer spills).
#   bash scripts/device_round14.sh kernels   GPU tests of every FP8 and shared-prefix path,
#                                            the decode kernels beside bf16, nano-vllm's
#                                            shape bf16 KV vs FP8 KV (4 and 8 warps)
#   bash scripts/device_round14.sh alone     the engine alone on the spike workload: bf16
#                                            base, FP8 KV, FP8 KV + shared-prefix attention
# (CHATQ_FP8_KV_WARPS was removed after the kernels call: 0.77x the bf16 kernel, 0.84x end to
# end; benchmarks.md.)
# carry (alone): [".cache/tok-smollm2", ".whl"] (see device_round10.sh); kernels: none.
set -uo pipefail
OUT=${OUT:-/tmp/chatq-round14}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
t0=$(date +%s)
el() { echo "$(($(date +%s) - t0))s"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
if [[ " $* " == *" kernels "* ]]; then
  echo "== GPU tests $(el)"
  timeout 200 python3 -m pytest -q -p no:cacheprovider -o addopts="" -k "not tensor_par" \
    tests/gpu_engine/test_fp8_kv.py tests/gpu_engine/test_shared_prefix.py 2>&1 \
    | grep -E "passed|failed|FAILED|Error" | tail -8
  echo "== decode kernels $(el)"
  timeout 100 python3 bench/fp8_kernels.py --parts decode 2>&1 | grep -E "^\| decode|Error"
  echo "== nano-vllm shape, KV bf16 vs fp8 $(el)"
  timeout 150 python3 bench/engine_throughput.py --hf-requests 0 --skip-roofline \
    --kv-cache-dtypes auto,fp8 2>&1 | grep -E "^\| \(a\)|Error" | grep -v "host ms"
  echo "== nano-vllm shape, KV fp8, CHATQ_FP8_KV_WARPS=8 $(el)"
  CHATQ_FP8_KV_WARPS=8 timeout 100 python3 bench/engine_throughput.py --hf-requests 0 \
    --skip-roofline --kv-cache-dtypes fp8 2>&1 | grep -E "^\| \(a\)|Error" | grep -v "host ms"
fi
if [[ " $* " == *" alone "* ]]; then
  source "$(dirname "$0")/device_env.sh"  # the carried wheels, PYTHONPATH
  for mode in ${ALONE_MODES:-base fp8 fp8-shared}; do
    echo "== engine alone, spike workload, $mode $(el)"
    case $mode in
      base) flag=() ;;
      shared) flag=(--shared-prefix) ;;
      fp8) flag=(--kv-cache-dtype fp8) ;;
      fp8-shared) flag=(--kv-cache-dtype fp8 --shared-prefix) ;;
      w8) flag=(--quantization fp8) ;;  # FP8 weights (later sessions)
      fp8-shared-w8) flag=(--kv-cache-dtype fp8 --shared-prefix --quantization fp8) ;;
    esac
    timeout 110 python3 bench/spike.py --out /tmp/spike-ab --tokenizer .cache/tok-smollm2 \
      --alone-requests 512 --alone-json "$OUT/alone_$mode.json" "${flag[@]}" ${ALONE_EXTRA:-} \
      > "$OUT/alone_$mode.log" 2>&1 || tail -5 "$OUT/alone_$mode.log"
  done
  python3 scripts/alone_table.py "$OUT"
fi
echo "== done $(el)"
