#!/usr/bin/env bash
# The test suite from a fresh clone: venv + requirements + test assets, then pytest.
# Re-running is cheap (pip and the asset fetch are no-ops when already satisfied).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -r requirements-test.txt
PYTHON=.venv/bin/python bash scripts/fetch_test_assets.sh
.venv/bin/python -m pytest -q "$@"
