"""Batch jobs from the shell: ``python -m cli clone|edit`` run as a real subprocess.

Covers: clones of texts from arguments and a text file with an instruction chain, a prompt clip
without transcript transcribed by the tiny Paraformer, a progress bar, one timing line per result and
a summary; a rerun skipping existing files and ``--overwrite`` hitting the same prompt cache; edits
of a folder with sidecar transcripts, iterations and ``--keep-passes``; a broken input failing alone
(exit 1) and bad arguments refused before any work (exit 2). Crash safety: a run killed mid-write
(file-size limit: SIGXFSZ) or by kill -9 just before the rename leaves no truncated output under the
final name, and the rerun writes the job whole (as long as its RIFF header says) and removes the
leftover; a second run on a locked output folder is refused.
"""

import re
import shutil
import signal
import subprocess
import sys

import pytest
import soundfile as sf

from testkit.paths import FIXTURES, ROOT

pytestmark = pytest.mark.slow

EXAMPLES = ROOT / "examples"


def _run(*args, cwd=ROOT):
    out = subprocess.run([sys.executable, "-m", "cli", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                         timeout=600)
    return out.returncode, out.stderr


@pytest.fixture(scope="module")
def common(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    shutil.copytree(FIXTURES / "tokenizer" / "Step-Audio-Tokenizer", root / "models" / "Step-Audio-Tokenizer")
    return root, ["--engine", "preview", "--cache-dir", root / "cache", "--model-root", root / "models"]


def _seconds(path) -> float:
    info = sf.info(str(path))
    return info.frames / info.samplerate


def test_clone_texts_with_instructions_and_a_transcribed_voice(common):
    root, flags = common
    lines = root / "lines.txt"
    lines.write_text("First line from a file.\n\nSecond line from a file.\n", encoding="utf-8")
    out = root / "clones"
    code, err = _run("clone", "--voice", EXAMPLES / "en_low.flac", "--text", "Hello from the shell.",
                     "--text-file", lines, "--instructions", "slower", "--out", out, "--seed", 3, *flags)
    assert code == 0, err
    names = sorted(p.name for p in out.iterdir())
    assert names == ["en_low_001.wav", "en_low_002.wav", "en_low_003.wav"]
    assert all(_seconds(out / n) > 0.5 for n in names)
    assert err.count("timing cli_clone ") == 3 and err.count("timing cli_edit_speed ") == 3
    assert err.count("timing cli_transcribe ") == 1 and "en_low.flac: transcribed as" in err
    assert "3/3" in err and "done: 3 of 3 job(s)" in err

    code, err = _run("clone", "--voice", EXAMPLES / "en_low.flac", "--voice-text", "The quiet harbour.",
                     "--text", "Hello from the shell.", "--out", out, *flags)
    assert code == 0 and "exist already and are skipped" in err and "done: 0 of 0" in err
    code, err = _run("clone", "--voice", EXAMPLES / "en_low.flac", "--voice-text", "The quiet harbour.",
                     "--text", "Hello from the shell.", "--out", out, "--overwrite", "--no-progress", *flags)
    assert code == 0 and re.search(r"timing cli_clone .*prompt_analysis:[0-9.]+\(hit\)", err)


def test_edit_a_folder_with_iterations(common):
    root, flags = common
    folder = root / "takes"
    (folder / "nested").mkdir(parents=True)
    shutil.copy(EXAMPLES / "en_low.flac", folder / "a.flac")
    (folder / "a.txt").write_text("The quiet harbour woke slowly.", encoding="utf-8")
    shutil.copy(EXAMPLES / "en_high.flac", folder / "nested" / "b.flac")
    (folder / "nested" / "b.txt").write_text("Please remember to water the plants.", encoding="utf-8")
    (folder / "broken.wav").write_bytes(b"not audio at all")
    out = root / "edits"
    code, err = _run("edit", folder, "--edit-type", "speed", "--edit-info", "slower", "--iterations", 2,
                     "--keep-passes", "--out", out, *flags)
    assert code == 1, err   # the broken file failed; the others were written
    assert "broken.speed-slower.wav (broken.wav) failed" in err and "done: 2 of 3 job(s)" in err
    assert sorted(p.name for p in out.iterdir()) == ["a.speed-slower.pass1.wav", "a.speed-slower.wav",
                                                     "b.speed-slower.pass1.wav", "b.speed-slower.wav"]
    assert _seconds(out / "a.speed-slower.wav") > 1.05 * _seconds(out / "a.speed-slower.pass1.wav")
    assert err.count("timing cli_edit_speed ") == 4 and "transcribed" not in err   # the sidecars were used


@pytest.mark.parametrize("args, message", [
    (["edit", EXAMPLES / "en_low.flac", "--edit-type", "speed", "--edit-info", "slower", "--iterations", "7"],
     "iterations must be a whole number from 1 to 5"),
    (["edit", EXAMPLES / "nope.wav", "--edit-type", "vad"], "no such file or folder"),
    (["clone", "--voice", EXAMPLES / "en_low.flac", "--text", "Hi.", "--instructions", "sing"], "cannot map 'sing'"),
    (["edit", EXAMPLES / "en_low.flac", "--edit-type", "emotion", "--edit-info", "joy"], "unknown emotion option"),
])
def test_bad_arguments_are_refused_before_any_work(common, tmp_path, args, message):
    _, flags = common
    code, err = _run(*args, "--out", tmp_path / "out", *flags)
    assert code == 2 and message in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ------------------------------------------------------------------------------------------ crash safety

# Runs the CLI with a crash injected at one step of writing an output into the folder argv[2].
_CRASHING_CLI = """
import os, resource, signal, sys
from pathlib import Path
import cli.batch, core.audio_io
crash, out = sys.argv[1], Path(sys.argv[2]).resolve()
real_encode, real_replace = core.audio_io.encode_audio, os.replace
def encode(*args, **kwargs):   # the file-size limit makes the write that follows die half-way (SIGXFSZ)
    data = real_encode(*args, **kwargs)
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)   # Python ignores it (the write would raise instead)
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(data) // 2, len(data) // 2))
    return data
def replace(src, dst, *args, **kwargs):   # kill -9 between the durable write and the publishing rename
    if Path(dst).resolve().parent == out:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *args, **kwargs)
if crash == "killed mid-write":
    core.audio_io.encode_audio = encode
else:
    os.replace = replace
sys.exit(cli.batch.main(sys.argv[3:]))
"""


def _whole_wav(path) -> bool:
    """Whether ``path`` is as long as its RIFF header says (a truncated write is shorter)."""
    data = path.read_bytes()
    return data[:4] == b"RIFF" and int.from_bytes(data[4:8], "little") + 8 == len(data) > 10_000


@pytest.mark.parametrize("crash", ["killed mid-write", "killed before the rename"])
def test_a_killed_run_leaves_no_truncated_output_and_a_rerun_completes_it(common, tmp_path, crash):
    _, flags = common
    name, out = "en_low_001.wav", tmp_path / "out"
    args = ["clone", "--voice", EXAMPLES / "en_low.flac", "--voice-text", "The quiet harbour.", "--text",
            "A short line.", "--out", out, "--seed", 5, "--no-progress", *flags]
    run = subprocess.run([sys.executable, "-c", _CRASHING_CLI, crash, out, *map(str, args)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == -(signal.SIGXFSZ if crash == "killed mid-write" else signal.SIGKILL), run.stderr
    assert not (out / name).exists()   # the final name never held a partial file
    (leftover,) = out.iterdir()
    assert leftover.name.startswith(f".{name}.") and leftover.name.endswith(".part")

    code, err = _run(*args)   # the rerun does not skip the job, and cleans the leftover
    assert code == 0 and "exist already" not in err and "removed 1 partial file(s)" in err, err
    assert [p.name for p in out.iterdir()] == [name] and _whole_wav(out / name)


def test_a_second_run_on_the_same_output_folder_is_refused(common, tmp_path):
    import fcntl
    import os

    _, flags = common
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)   # another run holds the folder
        code, err = _run("clone", "--voice", EXAMPLES / "en_low.flac", "--text", "Hi.", "--out", out, *flags)
    finally:
        os.close(fd)
    assert code == 2 and "another run is writing to" in err and not any(out.iterdir())
