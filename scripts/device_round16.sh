#!/usr/bin/env bash
# For the device session of 2026-12-07/08 (issue 21): why the FP8 decode kernel's 64-key
# tiles win alone (1.39-1.40x the bf16 kernel at nano-vllm's shape) and lose in the engine
# (1.12x against 1.22x at 128 keys, two calls apart): the same run, side by side, with the
# tile width as an env knob (CHATQ_FP8_KV_TILE, kernels/__init__.py).
#   bash scripts/device_round16.sh nano     decode kernels beside bf16; nano-vllm's shape with
#                                           bf16 KV, FP8 KV at 128-key tiles, FP8 KV at 64
#   bash scripts/device_round16.sh alone    the engine alone on the spike workload (prefix
#                                           split between programs, device_round15.sh): base,
#                                           shared, fp8-shared at 256 slots with a kernel table
#                                           of a full batch (--profile-steps); base and shared
#                                           at 512 slots (1,024 requests): the prefix read once
#                                           a group makes a larger batch cheap
#   bash scripts/device_round16.sh prefix   the shared-prefix kernels (device_round15.sh's
#                                           bench, without its tests)
# carry (alone): [".whl", ".bin", ".cache/tok-smollm2"]; nano, prefix: none.
set -uo pipefail
OUT=${OUT:-/tmp/chatq-round16}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
t0=$(date +%s)
el() { echo "$(($(date +%s) - t0))s"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
if [[ " $* " == *" nano "* ]]; then
  echo "== decode kernels $(el)"
  timeout 100 python3 bench/fp8_kernels.py --parts decode 2>&1 | grep -E "^\| decode|Error"
  echo "== nano-vllm shape, KV bf16 vs fp8 (128-key tiles) $(el)"
  timeout 150 python3 bench/engine_throughput.py --hf-requests 0 --skip-roofline \
    --kv-cache-dtypes auto,fp8 2>&1 | grep -E "^\| \(a\)|Error"
  echo "== nano-vllm shape, KV fp8, CHATQ_FP8_KV_TILE=64 $(el)"
  CHATQ_FP8_KV_TILE=64 timeout 100 python3 bench/engine_throughput.py --hf-requests 0 \
    --skip-roofline --kv-cache-dtypes fp8 2>&1 | grep -E "^\| \(a\)|Error"
fi
if [[ " $* " == *" alone "* ]]; then
  ALONE_MODES="base shared fp8-shared" ALONE_EXTRA="--profile-steps 10" OUT=$OUT/alone \
    bash "$(dirname "$0")/device_round14.sh" alone | grep -v "^== done"
  ALONE_MODES="base shared" ALONE_EXTRA="--max-num-seqs 512 --alone-requests 1024" \
    OUT=$OUT/alone512 bash "$(dirname "$0")/device_round14.sh" alone | grep -v "^== done"
fi
if [[ " $* " == *" prefix "* ]]; then
  echo "== shared-prefix kernels $(el)"
  timeout 130 python3 bench/fp8_kernels.py --parts prefix 2>&1 | grep -E "^\| (bf16|fp8)|Error"
fi
echo "== done $(el)"
