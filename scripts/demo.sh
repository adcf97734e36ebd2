#!/usr/bin/env bash
# Install, fetch SmolLM2-135M-Instruct once, and stream its answer to a chat question.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/splitserve models pull smollm2-135m-instruct >/dev/null
exec .venv/bin/splitserve chat "${1:-What is the capital of France?}"
