#!/usr/bin/env bash
# One device call for issue 7 on a 2-GPU machine (kind nvidia-h200-x2), with
# `carry: [".whl", ".bin", ".cache/tok-smollm2"]` as for scripts/device_spike.sh:
# throughput through the queue on 1 vs 2 GPUs (bench/multi_gpu_queue.py), then TP=2 parity
# with TP=1 (bench/multi_gpu.py, and the gpu-marked TP tests if time is left).
set -uo pipefail
OUT=${OUT:-/tmp/chatq-mg-out}
source "$(dirname "$0")/device_env.sh"
t0=$(date +%s)
nvidia-smi --query-gpu=index,name,memory.total --format=csv | tee "$OUT/gpu.txt"
echo "== queue: 1 vs 2 GPUs $(($(date +%s) - t0))s"
timeout ${MGQ_TIMEOUT_S:-300} python3 bench/multi_gpu_queue.py --out /tmp/mgq \
  --tokenizer .cache/tok-smollm2 --requests ${MGQ_REQUESTS:-2000} 2>&1 | tee "$OUT/mgq.log" | tail -6
cp /tmp/mgq/worker-*.log "$OUT/" 2>/dev/null
echo "== TP=2 parity $(($(date +%s) - t0))s"
timeout ${TP_TIMEOUT_S:-200} python3 bench/multi_gpu.py --out "$OUT/tp" 2>&1 \
  | tee "$OUT/tp.log" | grep -v "^\[" | tail -20
left=$((560 - ($(date +%s) - t0)))
if [ "$left" -gt 40 ]; then
  echo "== pytest TP gpu $(($(date +%s) - t0))s"
  timeout "$left" python3 -m pytest -q -p no:cacheprovider -o addopts="" -m gpu \
    tests/gpu_engine/test_tensor_parallel.py 2>&1 | tail -4
fi
echo "== done in $(($(date +%s) - t0))s"
