"""docs/api.md: its Python examples run, unchanged but for the server address, key and voice id.

Each fenced ``python`` block is executed in order against a real studio (preview engine) with
``voice.wav`` (a bundled example clip) in the working directory.
"""

import re
import shutil
from pathlib import Path

import pytest

from testkit.studio_server import start_studio

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
KEY = "docs-key"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "api.md").read_text(), flags=re.S)


def test_api_md_python_examples_run(tmp_path, monkeypatch, capsys):
    blocks = _blocks()
    assert len(blocks) >= 4
    studio = start_studio(tmp_path, None, "--api-key", KEY)
    try:
        work = tmp_path / "work"
        work.mkdir()
        import soundfile as sf

        samples, rate = sf.read(ROOT / "examples" / "en_low.flac")
        sf.write(work / "voice.wav", samples, rate)
        monkeypatch.chdir(work)
        voice_id = None
        # The voices example comes first in effect: it makes the voice the others use.
        order = sorted(blocks, key=lambda b: 0 if "/v1/audio/voices\"" in b else 1)
        for block in order:
            code = re.sub(r'^BASE = ".*"$', f'BASE = "{studio.url}"', block, flags=re.M)
            code = re.sub(r'^KEY = ".*"$', f'KEY = "{KEY}"', code, flags=re.M)
            if voice_id:
                code = re.sub(r'^VOICE = ".*?"', f'VOICE = "{voice_id}"', code, flags=re.M)
            namespace: dict = {}
            exec(compile(code, "docs/api.md", "exec"), namespace)  # noqa: S102 - our own documentation
            if "voice" in namespace and isinstance(namespace["voice"], dict):
                voice_id = namespace["voice"]["id"]
        out = capsys.readouterr().out
        assert voice_id and voice_id in out and "total_ms" in out
        assert "Bob: Is the harbour quiet?" in (work / "production.srt").read_text()
        for name in ("hello.wav", "again.wav", "faster.wav", "production.wav"):
            assert sf.info(work / name).samplerate == 24000
    finally:
        studio.stop()
        shutil.rmtree(tmp_path / "work", ignore_errors=True)
