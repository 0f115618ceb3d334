#!/usr/bin/env bash
# Issue 4's queue-layer benchmark on the GPU machine's host (16 cores: the worker's host
# loop, its tokenizer thread, Redis and the producer no longer share 2 cores), chatq next to
# arq in one run. Run with `carry: [".whl", ".whl-queue", ".bin"]`:
#   .whl-queue/   redis 5.3.1, hiredis, arq 0.28.0, click, PyJWT (arq needs redis < 6)
#   .bin/valkey-server
#   scripts/device_queue.sh [bench/queue_throughput.py args]
set -uo pipefail
OUT=${OUT:-/tmp/chatq-queue-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site-queue .whl-queue/*.whl || exit 1
export PYTHONPATH=/tmp/site-queue:$PWD
export CHATQ_REDIS_SERVER=$PWD/.bin/valkey-server
nproc; python3 -c "import arq, redis, hiredis; print('arq', arq.VERSION, 'redis', redis.__version__)"
date -u
[[ $# -eq 0 ]] && set -- --requests 20000 --latency-requests 500 --repeats 3
python3 bench/queue_throughput.py "$@" \
  2>&1 | tee "$OUT/queue_throughput.log" | tail -20
date -u
