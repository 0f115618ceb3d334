#!/usr/bin/env bash
# Set up what the demo needs (scripts/setup.sh demo: no dev tools, Triton only with a GPU)
# and run it: a private Redis, a CPU worker on SmolLM2-135M-Instruct, and a burst of
# customer-service chats. Extra args go to `chatq demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo
exec .venv/bin/chatq demo "$@"
