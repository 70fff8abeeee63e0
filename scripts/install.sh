#!/usr/bin/env bash
# Installs m2clip-fast in editable mode with the pinned torch stack.
# Usage: bash scripts/install.sh [EXTRAS]      e.g. bash scripts/install.sh test
# torch goes in first because the C++ extension is built against it (--no-build-isolation).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python -m pip install -q -c constraints.txt "torch==2.14.1" "torchvision==0.29.1" "setuptools>=64" wheel
spec="."
[ -n "$extras" ] && spec=".[${extras}]"
python -m pip install -q -c constraints.txt --no-build-isolation -e "$spec"
