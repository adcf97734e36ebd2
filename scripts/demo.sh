#!/usr/bin/env bash
# Install, fetch SmolLM2-135M-Instruct once, and bring the whole system up on this machine:
# a private Redis-compatible server, Ray Serve, prefill and decode replicas, the OpenAI-compatible
# router on http://127.0.0.1:8000 (gRPC Generate on 127.0.0.1:50051). Ctrl-C stops everything.
# Extra arguments go to `splitserve up` (e.g. --mode colocated, --model tiny, --port 8080).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/splitserve models pull smollm2-135m-instruct >/dev/null
exec .venv/bin/splitserve up "$@"
