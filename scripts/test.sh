#!/usr/bin/env bash
# The test suite from a fresh clone: venv + requirements + test assets, then pytest.
# Re-running is cheap (pip and the asset fetch are no-ops when already satisfied).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -r requirements-test.txt
# libtpu (AOT compilation tests) beside the environment, not in it: see requirements-test.txt.
libtpu_version=0.0.52
if ! PYTHONPATH=.venv/libtpu .venv/bin/python -c "import importlib.metadata as m, sys; sys.exit(m.version('libtpu') != '$libtpu_version')" 2>/dev/null; then
  .venv/bin/pip install -q --no-deps --upgrade --target .venv/libtpu "libtpu==$libtpu_version"
fi
PYTHON=.venv/bin/python bash scripts/fetch_test_assets.sh
# Two pytest workers (pytest-xdist; one module per worker): compiling dominates the suite and
# XLA compiles a program on one core. Files go out longest first (tests/conftest.py orders the
# collection; --no-loadscope-reorder keeps that order), so both workers finish together.
# PYTEST_WORKERS=0 runs in one process. `-m "not slow"` leaves out the tests that take more than
# ~30 s each.
.venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
