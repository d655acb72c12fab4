"""Where the repository and its test fixtures are, for tests and benchmarks alike."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
