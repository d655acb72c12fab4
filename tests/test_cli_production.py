"""``studio-batch script`` (``python -m cli script``) as a real subprocess.

Covers: a two-speaker script cast to two audio files (one with a sidecar transcript) rendered to audio,
SRT, WebVTT and manifest whose captions agree with the audio's length, every take scored by the page's
own quality hook; word-level captions when a recogniser is there; the production stored in the data
folder's database; bad arguments (no cast, a speaker missing from the cast, a malformed cast) refused
with exit 2 and a message. (SRT placement at its cues is covered through the API, tests/test_productions_api.py.)
"""

import json
import shutil
import subprocess
import sys

import pytest
import soundfile as sf

from testkit.paths import FIXTURES, ROOT

pytestmark = pytest.mark.slow

EXAMPLES = ROOT / "examples"
SCRIPT = "Alice: Good morning. The harbour is quiet.\n[S2] Then let us walk.\n"
EXAMPLE_TEXT = "The quiet harbour woke slowly as the first boats went out."


def _run(*args, cwd=ROOT):
    out = subprocess.run([sys.executable, "-m", "cli", "script", *map(str, args)], capture_output=True, text=True,
                         cwd=cwd, timeout=600)
    return out.returncode, out.stderr


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_script")
    for name in ("en_low.flac", "en_high.flac"):
        (root / name).write_bytes((EXAMPLES / name).read_bytes())
        (root / name).with_suffix(".txt").write_text(EXAMPLE_TEXT)
    (root / "dialogue.txt").write_text(SCRIPT)
    flags = ["--engine", "preview", "--cache-dir", root / "cache", "--data-dir", root / "data"]
    return root, flags


def test_a_script_with_a_cast_becomes_audio_and_captions(work):
    root, flags = work
    code, err = _run(root / "dialogue.txt", "--cast", f"Alice={root / 'en_low.flac'}", "--cast",
                     f"S2={root / 'en_high.flac'}", "--out", root / "out", "--format", "flac", "--no-progress", *flags)
    assert code == 0, err
    assert "done: dialogue.flac, dialogue.srt, dialogue.vtt, dialogue.json" in err
    manifest = json.loads((root / "out" / "dialogue.json").read_text())
    info = sf.info(str(root / "out" / "dialogue.flac"))
    assert info.frames == manifest["render"]["samples"]
    assert [s["speaker"] for s in manifest["segments"]] == ["Alice", "Alice", "S2"]
    srt = (root / "out" / "dialogue.srt").read_text()
    assert "Alice: Good morning." in srt and "S2: Then let us walk." in srt
    last = manifest["segments"][-1]
    assert last["end_sample"] == manifest["render"]["samples"]
    assert (root / "data" / "studio.db").is_file()
    # The same quality hook as the page: every take carries the default (signal) checks.
    assert all({"passed", "lufs"} <= set(s["take"]["scores"]) for s in manifest["segments"])
    assert all(s["words"] == [] for s in manifest["segments"])   # no recogniser under this --model-root


def test_with_a_recogniser_the_captions_are_word_level(work, tmp_path):
    """The tokenizer folder's Paraformer (tiny random weights: it hears nonsense) times every take; the
    captions then carry the script's words placed by those times, WebVTT with a tag before each later word."""
    root, flags = work
    models = tmp_path / "models"
    shutil.copytree(FIXTURES / "tokenizer" / "Step-Audio-Tokenizer", models / "Step-Audio-Tokenizer")
    code, err = _run(root / "dialogue.txt", "--cast", f"Alice={root / 'en_low.flac'}", "--cast",
                     f"S2={root / 'en_high.flac'}", "--out", root / "words", "--format", "wav", "--no-progress",
                     "--model-root", models, *flags)
    assert code == 0, err
    manifest = json.loads((root / "words" / "dialogue.json").read_text())
    for seg in manifest["segments"]:
        assert " ".join(w["word"] for w in seg["words"]) == seg["text"]
        assert all(seg["start_s"] - 1e-3 <= w["start"] <= w["end"] <= seg["end_s"] + 1e-3 for w in seg["words"])
    vtt = (root / "words" / "dialogue.vtt").read_text()
    first = manifest["segments"][0]
    assert f"{first['id']}-1\n" in vtt and "<v Alice>Good <00:" in vtt


@pytest.mark.parametrize("extra, message", [
    ((), "needs --cast"),
    (("--cast", "Alice=en_low.flac"), "no voice for 'S2'"),
    (("--cast", "Alice"), "NAME=VOICE"),
])
def test_bad_arguments_are_refused(work, extra, message):
    root, flags = work
    extra = tuple(str(root / e.split("=")[1]).join([e.split("=")[0] + "=", ""]) if "=" in e else e for e in extra)
    code, err = _run(root / "dialogue.txt", *extra, "--out", root / "bad", "--no-progress", *flags)
    assert code == 2 and message in err, err
