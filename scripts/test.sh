#!/usr/bin/env bash
# The test command: installs what it needs into .venv, lints, runs the whole suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh
.venv/bin/ruff check .
set +e
.venv/bin/python -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: failing on purpose, an empty suite is not a pass" >&2
  exit 1
fi
exit "$status"
