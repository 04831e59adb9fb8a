#!/usr/bin/env bash
# The test command: installs what it needs into .venv, lints, type-checks, runs the whole suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh
# The operator page's browser test drives Debian's chromium (Playwright comes with the dev extra).
# Without root or apt-get it is not installed here and that one test skips, saying why.
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null && [ "$(id -u)" -eq 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "could not install chromium: the operator page's browser test will skip" >&2
fi
.venv/bin/ruff check .
# mypy over the package (settings and the baseline that may only shrink: pyproject.toml [tool.mypy]).
.venv/bin/python scripts/typecheck.py
set +e
.venv/bin/python -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: failing on purpose, an empty suite is not a pass" >&2
  exit 1
fi
exit "$status"
