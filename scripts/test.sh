#!/usr/bin/env bash
# Install torchmerge with its test extras (torch pinned to the local CPU build) and run the tests.
# Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
"$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q -c scripts/constraints.txt -e ".[test]"
exec "$PY" -m pytest -q "$@"
