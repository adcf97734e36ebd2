#!/usr/bin/env bash
# Idempotent set-up: a project virtualenv in .venv with splitserve and its dependencies.
# Usage: scripts/setup.sh [EXTRAS]   e.g. scripts/setup.sh test, scripts/setup.sh test,bench
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
PY="${PYTHON:-python3}"

if ! "$PY" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
  echo "splitserve needs Python >= 3.11 ($PY is $("$PY" --version 2>&1))" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  if ! "$PY" -m venv .venv 2>/dev/null; then
    # Debian splits venv/ensurepip into its own package.
    rm -rf .venv
    if command -v apt-get >/dev/null; then
      apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
    fi
    "$PY" -m venv .venv
  fi
fi
# The bench extra's Mooncake wheel links libibverbs and librdmacm, even for TCP.
if [[ ",$extras," == *",bench,"* ]] && command -v apt-get >/dev/null \
  && ! dpkg -s libibverbs1 librdmacm1 >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq libibverbs1 librdmacm1 >/dev/null
fi
# The test extra: the dashboard tests scrape `splitserve up` with a real Prometheus.
if [[ ",$extras," == *",test,"* ]] && command -v apt-get >/dev/null \
  && ! command -v prometheus >/dev/null && [ ! -x /usr/bin/prometheus ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    --no-install-recommends prometheus >/dev/null
fi
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip
# torch first and pinned: here 2.13.0 resolves to a CPU build; an unpinned torch would pull a
# multi-GB CUDA build. TORCH_SPEC overrides (e.g. a CUDA build on a GPU workstation).
if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
  pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
spec="."
[ -n "$extras" ] && spec=".[$extras]"
pip install -q -e "$spec"
