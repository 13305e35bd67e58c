#!/usr/bin/env bash
# The project's one test command (the README shows it, .ci/run runs it): bootstrap, then lint,
# type-check and the whole test suite. Extra arguments go to pytest (e.g. -k contacts, -x).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/bootstrap.sh
.venv/bin/ruff check cssfs tests scripts
.venv/bin/mypy cssfs

status=0
.venv/bin/python -m pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "test.sh: pytest collected no tests: that is a failure" >&2
    exit 1
fi
exit "$status"
