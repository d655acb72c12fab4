"""Gradio's upload folder stays bounded: web.uploads against files on disk and a real studio.

Covers: ``sweep`` deleting expired files, then the oldest until the byte and file quotas hold, never a
protected file, and empty folders once they are old; the studio (preview engine, real uvicorn on
127.0.0.1, key login) keeping its ``GRADIO_TEMP_DIR`` within ``--upload-folder-max-files`` and
``--upload-folder-max-bytes`` across real ``/gradio_api/upload`` requests (checked as each answer
arrives), with expired files gone at the next upload and the page's example copies kept, while a
refused (not logged in) upload deletes nothing; and the settings refusing a folder quota smaller than
one upload.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest

from core.settings import load_settings
from web.uploads import sweep

KEY = "upload-test-key-123"


def _file(folder: Path, name: str, size: int, age_s: float) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))
    return path


def test_sweep_removes_expired_then_oldest_files_but_never_protected_ones(tmp_path):
    expired = _file(tmp_path, "a/expired.wav", 10, age_s=7200)
    kept_example = _file(tmp_path, "b/example.wav", 10, age_s=9000)
    old = _file(tmp_path, "c/old.wav", 40, age_s=300)
    middle = _file(tmp_path, "d/middle.wav", 40, age_s=200)
    new = _file(tmp_path, "e/new.wav", 40, age_s=10)
    (tmp_path / "z").mkdir()   # an empty folder left by an old upload
    os.utime(tmp_path / "z", (time.time() - 7200,) * 2)

    done = sweep(tmp_path, max_bytes=100, max_files=10, max_age_s=3600, protected=frozenset({str(kept_example)}))
    assert not expired.exists() and kept_example.exists()
    assert not old.exists() and middle.exists() and new.exists()   # 120 bytes -> 80: the oldest went
    assert (done.removed_files, done.removed_bytes, done.files, done.bytes) == (2, 50, 2, 80)
    # Only an empty folder untouched for a while goes (Gradio makes a folder, then writes into it).
    assert not (tmp_path / "z").exists() and (tmp_path / "a").exists()

    done = sweep(tmp_path, max_bytes=1000, max_files=1, max_age_s=3600, protected=frozenset({str(kept_example)}))
    assert (done.files, middle.exists(), new.exists(), kept_example.exists()) == (1, False, True, True)
    assert sweep(tmp_path, 1000, 1, 3600, frozenset({str(kept_example)})).removed_files == 0


def test_the_folder_quota_must_hold_one_upload():
    with pytest.raises(ValueError, match="upload_folder_max_bytes .* must be at least max_upload_bytes"):
        load_settings(["--max-upload-bytes", "2000", "--upload-folder-max-bytes", "1000"], env={})
    with pytest.raises(ValueError, match="upload_folder_max_age_s must be at least 1"):
        load_settings([], env={"STUDIO_UPLOAD_FOLDER_MAX_AGE_S": "0"})


def _folder_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


@pytest.mark.slow
def test_the_studio_keeps_its_upload_folder_within_quota_and_age(tmp_path, monkeypatch):
    from testkit.studio_server import start_studio

    folder = tmp_path / "gradio"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(folder))   # read by Gradio and by create_app at start
    studio = start_studio(tmp_path, None, "--api-key", KEY, "--max-upload-bytes", "100000",
                          "--upload-folder-max-bytes", "250000", "--upload-folder-max-files", "3")
    try:
        examples = _folder_files(folder)   # the page's example clips, copied there at start
        assert len(examples) == 3
        stale = _file(folder, "stale/left-from-yesterday.wav", 1000, age_s=2 * 3600)
        with httpx.Client(base_url=studio.url, timeout=60) as client:
            anonymous = client.post("/gradio_api/upload", files={"files": ("x.wav", b"y" * 1000, "audio/wav")})
            assert anonymous.status_code in (401, 403)
            assert stale.exists()   # a refused upload makes no file go

            assert client.post("/login", data={"username": "me", "password": KEY}).status_code == 200
            paths = []
            for i in range(5):
                answer = client.post("/gradio_api/upload",
                                     files={"files": (f"take{i}.wav", bytes([i]) * 60_000, "audio/wav")})
                assert answer.status_code == 200, answer.text
                (path,) = answer.json()
                paths.append(Path(path))
                held = [p for p in _folder_files(folder) if p not in examples]
                assert len(held) <= 3 and sum(p.stat().st_size for p in held) <= 250_000
                assert paths[-1].read_bytes() == bytes([i]) * 60_000   # the new upload itself is kept
                time.sleep(0.05)   # distinct modification times: "oldest" is well defined
        assert not stale.exists() and all(p.exists() for p in examples)   # the example buttons keep working
        assert [p.exists() for p in paths] == [False, False, True, True, True]   # 3 files at most
    finally:
        studio.stop()
