#!/usr/bin/env bash
# For the device session of 2026-12-07 (issue 21): the shared-prefix kernel's prefix split
# between several programs (PREFIX_SPLITS: at 256 sequences of GQA 6 one group was 64
# programs, half the H100's SMs, each walking the whole 1,024-token prefix alone).
#   bash scripts/device_round15.sh prefix    the shared-prefix path at the spike's decode shape
#                                            (bench/fp8_kernels.py --parts prefix), bf16 and
#                                            FP8, by prefix split count; the GPU tests of the
#                                            shared-prefix, FP8 KV and decode kernels
#   bash scripts/device_round15.sh alone     the engine alone on the spike workload, one row
#                                            per mode of ALONE_MODES (base shared fp8
#                                            fp8-shared), 512 requests each
# carry (alone): [".cache/tok-smollm2", ".whl", ".bin"] (device_env.sh); prefix: none.
set -uo pipefail
OUT=${OUT:-/tmp/chatq-round15}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
t0=$(date +%s)
el() { echo "$(($(date +%s) - t0))s"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
if [[ " $* " == *" prefix "* ]]; then
  echo "== shared-prefix kernels $(el)"
  timeout 120 python3 bench/fp8_kernels.py --parts prefix 2>&1 | grep -E "^\| (bf16|fp8)|Error"
  echo "== GPU tests $(el)"
  timeout 240 python3 -m pytest -q -p no:cacheprovider -o addopts="" -k "not tensor_par" \
    tests/gpu_engine/test_shared_prefix.py tests/gpu_engine/test_fp8_kv.py \
    tests/gpu_engine/test_kernels.py 2>&1 | grep -E "passed|failed|FAILED|Error" | tail -8
fi
if [[ " $* " == *" alone "* ]]; then
  # device_round14's loop, with one more mode (shared: bf16 KV + shared-prefix attention).
  ALONE_MODES=${ALONE_MODES:-base shared fp8 fp8-shared} OUT=$OUT \
    bash "$(dirname "$0")/device_round14.sh" alone | grep -v "^== done"
fi
echo "== done $(el)"
