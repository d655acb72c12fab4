"""Benchmark: a production of about 5 minutes of speech (60 segments, two voices) on the preview engine.

Measures, in one process with one SQLite user-data database: generate-all (every segment submitted at
once to the production service's pool), regenerate-one (a new take of one segment; target: under 1/20
of generate-all), render (WAV, EBU R128 loudness, captions and manifest) and its peak Python memory
(``tracemalloc``: numpy's buffers are counted) against the size of one copy of the render's float32
samples, plus the process's peak RSS. Each regenerate-one and render is repeated (``--runs``) and
summarised (count, median, p90, p99, max); generate-all runs once (it is the baseline the ratio uses).
The machine load (``os.getloadavg``) is printed at the start and the end: the machine may be shared.

Usage:
    .venv/bin/python bench/production_bench.py [--segments 60] [--runs 5] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
import tracemalloc
import warnings
from pathlib import Path

from common import cells, environment_header, summary

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from core.audio_io import load_audio
    from core.settings import load_settings
    from funasr_cache.store import PromptCache
    from preview.engine import PreviewEngine
    from productions.service import ProductionService
    from testkit.studio_server import speech_wav
    from userdata.db import open_database
    from userdata.productions import ProductionStore
    from userdata.voices import VoiceStore

WORDS = ("harbour morning boats water light river market window garden letter evening station bridge "
         "winter summer forest village mountain coffee journey").split()


def script(segments: int) -> str:
    """Two speakers taking turns, one sentence of 15 words (about 5 s of preview speech) each."""
    lines = []
    for i in range(segments):
        words = [WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(10)]
        speaker = "Alice" if i % 2 == 0 else "Bob"
        lines.append(f"{speaker}: We walked past the {words[0]} and the {words[1]}, then the {words[2]} "
                     f"near the {words[3]}.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segments", type=int, default=60)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args()
    load_start = os.getloadavg()

    root = Path(tempfile.mkdtemp(prefix="production-bench-"))
    settings = load_settings(["--engine", "preview", "--cache-dir", str(root / "cache"), "--data-dir",
                              str(root / "data")], env={})
    engine = PreviewEngine(settings, PromptCache.from_settings(settings))
    db = open_database(settings)
    voices = VoiceStore(db)
    cast = {}
    for name, f0 in (("Alice", 210.0), ("Bob", 115.0)):
        clip = load_audio(speech_wav(seconds=4.0, f0=f0, seed=int(f0)))
        engine.prepare_prompt(clip)
        cast[name] = voices.create(clip, "A short sentence for the voice.", name, engine.prompt_namespaces()).id
    service = ProductionService(engine, ProductionStore(db), voices, settings, renders_dir=root / "renders")
    lines = [environment_header("cpu", "float32", [f"segments {args.segments}", f"workers {settings.llm_max_rows}",
                                                   f"runs {args.runs}"]),
             f"load average at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f} (1/5/15 min)", ""]

    production = service.create("bench", "script", script(args.segments), cast=cast)
    started = time.perf_counter()
    job = service.generate(production.id)
    while not job.done:
        job.wait_change(-1, 5.0)
    generate_all_s = time.perf_counter() - started
    snap = job.snapshot()
    assert snap["counts"]["ready"] == args.segments, snap["counts"]
    production = service.store.get(production.id)
    speech_s = sum(s.chosen.duration_ms for s in production.segments) / 1000

    regen_ms = []
    for i in range(args.runs):
        seg = production.segments[(i * 13) % len(production.segments)]
        started = time.perf_counter()
        one = service.generate(production.id, [seg.id])
        while not one.done:
            one.wait_change(-1, 5.0)
        regen_ms.append((time.perf_counter() - started) * 1000)
        assert one.snapshot()["counts"]["ready"] == 1

    render_ms, peaks = [], []
    for i in range(args.runs):
        for old in (root / "renders").rglob("*"):   # render again, not the kept file
            if old.is_file():
                old.unlink()
        tracemalloc.start()
        started = time.perf_counter()
        rendered = service.render(production.id, "wav")
        render_ms.append((time.perf_counter() - started) * 1000)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    m = rendered.manifest["render"]
    one_copy = m["samples"] * 4
    ratio = summary(regen_ms)["median"] / (generate_all_s * 1000)
    load_end = os.getloadavg()
    lines += [
        f"speech: {speech_s:.1f} s in {args.segments} segments (render {m['duration_s']:.1f} s with pauses; "
        f"loudness {m['loudness_lufs']} LUFS, target {m['loudness_target_lufs']})", "",
        "| step | count | median ms | p90 ms | p99 ms | max ms |", "|---|---|---|---|---|---|",
        f"| generate-all (once) | 1 | {generate_all_s * 1000:.0f} | | | |",
        f"| regenerate-one | {cells(summary(regen_ms), 0)} |",
        f"| render wav | {cells(summary(render_ms), 0)} |", "",
        f"generate-all: {generate_all_s:.1f} s, RTF {generate_all_s / speech_s:.3f} (wall / speech seconds)",
        f"regenerate-one / generate-all (median): {ratio:.4f} = 1/{1 / ratio:.0f} (target < 1/20: "
        f"{'met' if ratio < 1 / 20 else 'NOT met'})",
        f"render peak traced memory: {max(peaks) / 2**20:.1f} MiB = {max(peaks) / one_copy:.2f} x one float32 copy of "
        f"the render ({one_copy / 2**20:.1f} MiB); process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB",
        f"load average at end: {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f} (1/5/15 min)",
    ]
    service.close()
    engine.close()
    db.close()
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
