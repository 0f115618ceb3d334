#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the demo: a private Redis, a CPU worker on
# SmolLM2-135M-Instruct, and a burst of customer-service chats. Extra args go to `chatq demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/chatq demo "$@"
