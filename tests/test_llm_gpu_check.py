"""bench/gpu_check.py --all --dry-run: the GPU script's CPU rehearsal, run as the lent GPU machine would run it.

The GPU machine has torch, numpy, safetensors, transformers and onnxruntime but no funasr, soundfile, soxr,
librosa, kaldi_native_fbank, jiwer, pyloudnorm or gradio. The script runs here in a subprocess whose imports
of those fail (a ``sys.meta_path`` blocker), so a new transitive import of a missing package breaks this test
instead of the GPU run. Every part must produce its rows; the vq02 part, which needs funasr, must fail loudly (its
row, the exit code), never be skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT

MISSING_ON_GPU = ("funasr", "soundfile", "soxr", "librosa", "kaldi_native_fbank", "jiwer", "pyloudnorm", "gradio")

RUNNER = f"""
import runpy, sys
class Missing:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {MISSING_ON_GPU!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not on the GPU machine)")
        return None
sys.meta_path.insert(0, Missing())
sys.path.insert(0, "bench")   # as Python does for ``python3 bench/gpu_check.py``
sys.argv = ["bench/gpu_check.py", "--all", "--dry-run"]
runpy.run_path("bench/gpu_check.py", run_name="__main__")
"""


@pytest.fixture(scope="module")
def dry_run():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", RUNNER], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=500)
    table = done.stdout[done.stdout.rindex("| part | measure | value |"):]
    rows = [line.split(" | ") for line in table.splitlines()[2:] if line.startswith("| ")]
    return done, {(r[0].lstrip("| "), r[1]): r[2].rstrip(" |") for r in rows}


def test_every_part_reports_and_vq02_fails_loudly_without_funasr(dry_run):
    done, rows = dry_run
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    parts = {part for part, _ in rows}
    assert parts == {"llm", "ttfa", "stream", "vq02", "bestof", "tf32", "all"}
    assert rows[("vq02", "FAILED")].startswith("Failed: funasr is not installed")
    assert [k for k in rows if k[1] == "FAILED"] == [("vq02", "FAILED")]   # every other part ran
    assert "1 part(s) FAILED" in done.stdout
    header = next(line for line in done.stdout.splitlines() if line.startswith("gpu_check --all"))
    assert "stand-ins for missing soundfile, soxr, librosa, kaldi_native_fbank, jiwer, pyloudnorm" in header


def test_the_table_holds_numbers_for_each_measure(dry_run):
    _, rows = dry_run
    llm = [m for part, m in rows if part == "llm"]
    assert sum("native decode" in m for m in llm) == 2 and sum("prefill" in m for m in llm) == 2
    assert sum(part == "ttfa" for part, _ in rows) == 2
    assert sum(part == "bestof" and "best-of-3" in m for part, m in rows) == 2
    for (part, measure), value in rows.items():
        if part != "vq02":
            assert value[:1].isdigit() and "nan" not in value.lower(), (part, measure, value)
    # The streamed and non-streamed decodes of the same ids gave the same number of samples (else FAILED).
    assert "streamed / non-streamed total" in next(m for part, m in rows if part == "stream")


def test_a_stand_in_module_fails_on_first_use():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from gpu_check import _absent
    finally:
        sys.path.remove(str(ROOT / "bench"))
    module = _absent("soundfile")
    with pytest.raises(RuntimeError, match="soundfile.write was used, but soundfile is not installed"):
        module.write
