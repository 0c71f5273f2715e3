#!/usr/bin/env bash
# Install torchmerge with the example extras (torch pinned to the local CPU build) and run the demo.
# Usage: bash scripts/demo.sh [extra demo args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
"$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q -c scripts/constraints.txt -e ".[examples]"
exec torchmerge demo "$@"
