#!/usr/bin/env bash
# Install everything the test suite needs (into ./.venv) and run it. Used by CI (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --test
export HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False PYTHONUNBUFFERED=1
exec .venv/bin/python -m pytest "$@"
