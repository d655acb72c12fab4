#!/usr/bin/env bash
# Create ./.venv and install the pinned dependencies. With --test, also the test tools and the
# system packages the browser tests use (Debian's chromium; needs root or sudo, skipped otherwise),
# Debian's postgresql (the voice-store tests start a throwaway server) and
# ffmpeg (the page's streaming player converts audio chunks with it; without it results show when whole).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip install --disable-pip-version-check -q "$@"; }
pip -r requirements.txt
# The project itself, editable: tests, benchmarks and scripts import its packages without sys.path edits.
pip --no-deps --no-build-isolation -e .
if [ "${1:-}" = "--test" ]; then
    pip -r requirements-test.txt
    # resemblyzer's declared deps (webrtcvad sdist, typing) break on current setuptools;
    # webrtcvad-wheels in requirements-test.txt provides the same module.
    pip --no-deps resemblyzer==0.1.4
    # postgresql: the voice-store tests also run on a real server (a throwaway cluster, testkit/postgres.py).
    if ! command -v chromium >/dev/null 2>&1 || ! command -v ffmpeg >/dev/null 2>&1 \
            || ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
        SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
        if $SUDO true 2>/dev/null; then
            $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends chromium ffmpeg \
                postgresql >/dev/null
        else
            echo "note: chromium/ffmpeg/postgresql are not installed and no root: the browser and PostgreSQL" \
                 "tests are skipped and the page shows results when whole" >&2
        fi
    fi
fi
