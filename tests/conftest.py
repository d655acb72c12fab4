"""Shared test setup: offline environment, fixture paths, small helpers."""

import os
from pathlib import Path

# Before anything imports gradio / transformers / funasr: never reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


import pytest

from testkit.paths import FIXTURES, ROOT  # noqa: F401  (re-exported for the tests)


@pytest.fixture
def fixtures() -> Path:
    return FIXTURES
