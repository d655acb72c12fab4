"""The repository's shape: the design card's names at the top, and imports that flow one way.

Reads the tree as text (``ast``), so a stray import against the flow fails here before it becomes a
circle at run time.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Each package and the project packages it must never import (the layers above it).
ABOVE = {
    "core": {"funasr_cache", "tokenizer", "llm", "decoder", "tts_engine", "preview", "web", "cli", "userdata"},
    "funasr_cache": {"tokenizer", "llm", "decoder", "tts_engine", "preview", "web", "cli", "userdata"},
    "tokenizer": {"llm", "decoder", "tts_engine", "preview", "web", "cli", "userdata"},
    "llm": {"tts_engine", "preview", "web", "cli", "userdata"},
    "decoder": {"tts_engine", "preview", "web", "cli", "userdata"},
    "tts_engine": {"web", "cli", "userdata"},
    "preview": {"web", "cli", "userdata"},
    # What users make: used by web/ only; it knows no engine or model.
    "userdata": {"tokenizer", "llm", "decoder", "tts_engine", "preview", "web", "cli"},
    # Productions: the domain of scripts, segments and takes; the web and the CLI use it, it uses the engine.
    "productions": {"web", "cli", "userdata", "preview"},
    # Scoring knows only core: the engine's models reach it as objects (quality.engine_models).
    "quality": {"funasr_cache", "tokenizer", "llm", "decoder", "tts_engine", "preview", "web", "cli", "userdata",
                "productions"},
}


def _imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_design_cards_names_are_at_the_top():
    for name in ("app.py", "tokenizer", "tts_engine", "funasr_cache", "models", "cache", "Dockerfile",
                 "docker-compose.yml", "requirements.txt", "tests", "docs", "README.md"):
        assert (ROOT / name).exists(), f"{name} is missing at the repository's top level"
    for old in ("engine", "prompt_cache"):
        assert not (ROOT / old).exists(), f"{old}/ was renamed; one name per thing"


@pytest.mark.parametrize("package", ["tts_engine", "funasr_cache", "tokenizer"])
def test_the_named_packages_import(package):
    module = importlib.import_module(package)
    assert Path(module.__file__).resolve().parent == ROOT / package


@pytest.mark.parametrize("package", sorted(ABOVE))
def test_imports_flow_one_way(package):
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        wrong = _imported_packages(path) & ABOVE[package]
        if wrong:
            offenders.append(f"{path.relative_to(ROOT)} imports {sorted(wrong)}")
    assert not offenders, "imports against the flow:\n" + "\n".join(offenders)
