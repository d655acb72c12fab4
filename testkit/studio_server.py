"""Test helper: run the real studio app (UI + API) on 127.0.0.1, in a background thread
(``start_studio``) or as its own ``python app.py`` process (``start_studio_process``, for memory and
temp-file measurements and the load bench).

Each server gets a free port and its own cache folder; ``stop()`` shuts uvicorn down and closes
the engine through the app's lifespan.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import soundfile as sf
import uvicorn

from core.settings import load_settings
from funasr_cache.store import PromptCache
from web.server import create_app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Studio:
    url: str
    engine: object
    settings: object
    app: object
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


def start_studio(root: Path, engine_factory: Callable | None = None, *flags: str) -> Studio:
    """Start a studio whose cache lives under ``root``; ``engine_factory(settings, cache)`` makes
    the engine (the preview engine when None); ``flags`` are extra command-line settings."""
    if engine_factory is None:
        from preview.engine import PreviewEngine as engine_factory
    port = free_port()
    settings = load_settings(["--cache-dir", str(root / "cache"), "--data-dir", str(root / "data"), "--port", str(port),
                               *flags], env={})
    engine = engine_factory(settings, PromptCache.from_settings(settings))
    app = create_app(engine, settings, output_dir=root / "outputs")
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, timeout_graceful_shutdown=1,
                            lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"studio-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the studio server did not start")
        time.sleep(0.05)
    return Studio(f"http://127.0.0.1:{port}", engine, settings, app, server, thread)


def speech_wav(seconds: float = 1.6, rate: int = 16000, f0: float = 140.0, seed: int = 0) -> bytes:
    """A voiced, speech-like test clip (harmonics with a slow pitch glide and syllable envelope) as WAV bytes."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    pitch = f0 * (1 + 0.08 * np.sin(2 * np.pi * 0.7 * t))
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = 0.5 * (1 - np.cos(2 * np.pi * 3.0 * t)) ** 1.5
    samples = 0.25 * voiced * envelope / np.abs(voiced).max() + 0.002 * rng.standard_normal(len(t))
    buffer = io.BytesIO()
    sf.write(buffer, samples.astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


@dataclass
class StudioProcess:
    """A studio running as its own process (``python app.py``), so its memory and temp files are its own."""

    url: str
    proc: subprocess.Popen
    tmpdir: Path          # the process's TMPDIR (where multipart uploads spool)
    log_path: Path

    def rss_kib(self, field: str = "VmRSS") -> int:
        """``VmRSS`` (now) or ``VmHWM`` (peak) of the server process, in KiB, from /proc."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise RuntimeError(f"{field} not in /proc/{self.proc.pid}/status")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_studio_process(root: Path, *flags: str, timeout_s: float = 120) -> StudioProcess:
    """``python app.py --engine preview`` on a free loopback port, cache and temp files under ``root``;
    ``flags`` are extra command-line settings. Waits until ``/healthz`` answers."""
    import httpx

    from testkit.paths import ROOT

    port = free_port()
    tmpdir = root / "tmp"
    tmpdir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("STUDIO_")}
    env.update(TMPDIR=str(tmpdir), GRADIO_TEMP_DIR=str(root / "gradio"), HF_HUB_OFFLINE="1",
               GRADIO_ANALYTICS_ENABLED="False", PYTHONPATH=str(ROOT))
    log_path = root / "server.log"
    cmd = [sys.executable, str(ROOT / "app.py"), "--engine", "preview", "--host", "127.0.0.1", "--port", str(port),
           "--cache-dir", str(root / "cache"), "--data-dir", str(root / "data"), *flags]
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    studio = StudioProcess(f"http://127.0.0.1:{port}", proc, tmpdir, log_path)
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            studio.stop()
            raise RuntimeError(f"the studio process did not start:\n{studio.log()[-3000:]}")
        try:
            if httpx.get(studio.url + "/healthz", timeout=2).status_code == 200:
                return studio
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
