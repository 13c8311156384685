#!/usr/bin/env bash
# One command from a fresh clone to a green test suite:
#   creates .venv, installs the CPU build of torch 2.13.0 FIRST (so no newer multi-GB CUDA build is pulled in),
#   installs pbe with its test extra (diffusers/transformers/scipy: the parity reference), then runs pytest.
# Extra arguments are passed to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test,train]"
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest "$@"
