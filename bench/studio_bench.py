"""Benchmark: what the studio's HTTP and Gradio layers add on top of an engine call.

Runs one studio (preview engine, prompt cached) on 127.0.0.1 in this process and times, in
interleaved rounds so that background load hits all of them alike:

* ``engine``:  ``engine.clone`` called directly (the baseline),
* ``http``:    ``POST /v1/audio/speech`` with a stored voice (openai-style JSON, WAV answer),
* ``gradio``:  the page's ``/clone`` endpoint through ``gradio_client`` (upload, queue, file),

plus the cheap operations endpoints (``/healthz``, ``/metrics``, ``/v1/cache/stats``). Reports
count, median, p90, p99, max in ms (no means) and each layer's median as a ratio of the engine's.
One warm-up round is run and not counted.

Usage:
    .venv/bin/python bench/studio_bench.py [--runs 20] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

from common import ROOT, cells, environment_header, interleaved, summary

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import httpx
    from gradio_client import Client, handle_file

    from testkit.studio_server import start_studio

PROMPT = ROOT / "examples" / "en_low.flac"
PROMPT_TEXT = "The quiet harbour woke slowly as the first boats went out."
TARGET = "Good morning. This sentence is spoken for the benchmark."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--markdown", type=Path, help="also write the results as a markdown section here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    studio = start_studio(Path(tempfile.mkdtemp(prefix="studio-bench-")))
    engine = studio.engine
    try:
        http = httpx.Client(base_url=studio.url, timeout=300)
        voice = http.post("/v1/audio/voices", files={"file": (PROMPT.name, PROMPT.read_bytes(), "audio/flac")},
                          data={"transcript": PROMPT_TEXT}).json()
        prompt_audio = studio.app.state.voices.audio(voice["id"])
        client = Client(studio.url + "/", verbose=False, download_files=False)
        upload = handle_file(str(PROMPT))

        cases = {
            "engine": lambda: engine.clone(prompt_audio, PROMPT_TEXT, TARGET, seed=1),
            "http": lambda: http.post("/v1/audio/speech", json={"input": TARGET, "voice": voice["id"], "seed": 1,
                                                                "response_format": "wav"}).raise_for_status(),
            "gradio": lambda: client.predict(upload, PROMPT_TEXT, TARGET, 1, 10, "wav", api_name="/clone"),
            "healthz": lambda: http.get("/healthz").raise_for_status(),
            "metrics": lambda: http.get("/metrics").raise_for_status(),
            "cache_stats": lambda: http.get("/v1/cache/stats").raise_for_status(),
        }
        times = interleaved(cases, args.runs, warmup=1)
    finally:
        studio.stop()

    base = summary(times["engine"])["median"]
    header = [
        environment_header("cpu", "float32", [f"engine {engine.describe().name}"]),
        "", "| path | count | median ms | p90 ms | p99 ms | max ms | median / engine |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    rows = []
    for name, ms in times.items():
        s = summary(ms)
        ratio = f"{s['median'] / base:.2f}×" if name in ("engine", "http", "gradio") else "–"
        rows.append(f"| {name} | {cells(s, 1)} | {ratio} |")
    text = "\n".join(header + rows)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
