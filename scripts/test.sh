#!/usr/bin/env bash
# Install what the tests need and run the whole suite. pytest exits 5 when it collected no
# tests; that is a failure here like any other non-zero exit.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest "$@"
