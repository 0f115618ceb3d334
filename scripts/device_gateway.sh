#!/usr/bin/env bash
# Issue 15's gateway benchmark on the GPU machine's host (16 cores): latency the HTTP
# gateway adds over the direct ChatClient (p50 / p99, non-streaming and first streamed
# text) and requests/s with 1 and 4 gateway processes, zero-cost engine, one run.
# The host has no registry and none of the gateway's packages: prepare them here first
# (bash scripts/gateway_wheels.sh), then run with `carry: [".whl-gateway", ".bin"]`:
#   bash scripts/device_gateway.sh [bench/gateway.py args]
set -uo pipefail
OUT=${OUT:-/tmp/chatq-gateway-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site-gw .whl-gateway/*.whl || exit 1
export PYTHONPATH=/tmp/site-gw:$PWD
export CHATQ_REDIS_SERVER=$PWD/.bin/valkey-server
nproc
python3 -c "import fastapi, uvicorn, uvloop, httptools, orjson, redis; print('fastapi', fastapi.__version__, 'uvicorn', uvicorn.__version__, 'redis', redis.__version__)"
date -u
[[ $# -eq 0 ]] && set -- --latency-requests 2000 --gateway-processes 1,4 --load-processes 6 \
  --connections 64 --seconds 10 --worker-host-processes 2
python3 bench/gateway.py "$@" 2>&1 | tee "$OUT/gateway.log" | tail -24
date -u
