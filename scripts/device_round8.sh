#!/usr/bin/env bash
# One device call for the next session (written 2026-12-07), each part under its own limit:
#   1. issue 21: Qwen2.5-7B shape at batch 1, bf16 vs FP8 weights, the synchronous step and
#      the engine's pipelined loop side by side (host idle: before the build);
#   2. issue 22: flash-attn built from its sdist (~80 s), its backend's tests with the real
#      package, bench/attention_race.py (our kernels vs flash-attn's), and nano-vllm's shape
#      with each backend.
# carry: [".whl-flash"] (scripts/flash_attn_sdist.sh).
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
t0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
echo "== 7B batch 1 $(($(date +%s) - t0))s"
timeout "${T1:-150}" python3 bench/engine_throughput.py --hf-requests 0 --skip-chatq \
  --quantizations none,fp8 --batches 1 2>&1 | grep -E "^\| \(b\)|Error" | head
echo "== flash-attn $(($(date +%s) - t0))s"
WAIT_S=300 TEST_S=90 RACE_S=240 bash scripts/device_flash_attn.sh build test race engine
echo "== done $(($(date +%s) - t0))s"
