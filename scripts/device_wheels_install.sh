#!/usr/bin/env bash
# On the GPU machine: bash scripts/device_wheels_install.sh PART_DIR K N [STORE]
# Keeps part K of N (made by scripts/device_wheels.py) in STORE (/tmp/device-wheels); with the
# last part, joins cut wheels, checks every sha256 against MANIFEST and installs them into
# /tmp/site.
set -euo pipefail
part=$1 k=$2 n=$3
store=${4:-/tmp/device-wheels}
mkdir -p "$store"
cp "$part"/* "$store"/
if [ "$k" -lt "$n" ]; then
  echo "part $k of $n kept in $store"
  exit 0
fi
cd "$store"
for first in *.whl.00; do
  [ -e "$first" ] || continue
  whl=${first%.00}
  cat "$whl".[0-9][0-9] > "$whl"
  rm "$whl".[0-9][0-9]
done
sha256sum -c --quiet MANIFEST
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site ./*.whl
echo "installed $(ls ./*.whl | wc -l) wheels into /tmp/site: export PYTHONPATH=/tmp/site"
