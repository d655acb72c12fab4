"""Shared test setup: offline environment, fixture paths, small helpers."""

import os
import sys
from pathlib import Path

# Before anything imports gradio / transformers / funasr: never reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402


@pytest.fixture
def fixtures() -> Path:
    return FIXTURES
