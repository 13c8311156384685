#!/usr/bin/env bash
# One command from a fresh clone to a green test suite:
#   creates .venv, installs the CPU build of torch 2.13.0 FIRST (so no newer multi-GB CUDA build is pulled in),
#   installs pbe with its test extra (diffusers/transformers/scipy: the parity reference) and its train and serve
#   extras, installs Debian's chromium when /usr/bin/chromium is missing (the web page's browser test drives it), then
#   runs pytest.
# Extra arguments are passed to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

# The browser test (tests/test_serve_browser.py) drives Debian's chromium through Playwright, which cannot download
# its own browsers offline; it fails, never skips, without one.
if [ ! -x /usr/bin/chromium ]; then
    echo "setup: /usr/bin/chromium is missing (tests/test_serve_browser.py drives it): installing it" >&2
    if [ "$(id -u)" -eq 0 ]; then
        SUDO=()
    elif command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
    else
        echo "setup: cannot install chromium: not root and no sudo; as root run: apt-get install -y chromium" >&2
        exit 1
    fi
    APT=(${SUDO[@]+"${SUDO[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get -q)
    # The package lists may be current already (install at once) or stale (refresh them, then install).
    if ! command -v apt-get >/dev/null 2>&1 ||
            ! { "${APT[@]}" install -y chromium || { "${APT[@]}" update && "${APT[@]}" install -y chromium; }; } ||
            [ ! -x /usr/bin/chromium ]; then
        echo "setup: installing chromium failed: install Debian's chromium package so that /usr/bin/chromium exists" \
             "(apt-get install -y chromium), then run this script again" >&2
        exit 1
    fi
fi

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test,train,serve]"
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest "$@"
