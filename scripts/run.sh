#!/usr/bin/env bash
# Install the pinned runtime (into ./.venv) and start the studio on http://127.0.0.1:7860.
# Extra arguments go to app.py (see `python app.py --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export GRADIO_ANALYTICS_ENABLED=False
exec .venv/bin/python app.py "$@"
