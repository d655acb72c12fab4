"""Benchmark: the CPU preview engine's request latency, prompt cache cold vs warm, and edits.

Measures ``PreviewEngine.clone`` on a 5 s prompt (eSpeak speech made into another voice with
WORLD) with a two-sentence target, once with a fresh cache per request (the prompt analysis
runs: the baseline) and once with the prompt cached, plus each DSP edit type on the clone's
output. Reports count, median, p90, p99, max (ms; no means), real-time factor, and the warm/cold
ratio measured in the same process. One warm-up request is run and not counted.

Usage:
    .venv/bin/python bench/preview_bench.py [--runs 8] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from common import cells, environment_header, summary

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from core.audio_io import Audio, resample
    from core.settings import Settings
    from funasr_cache.store import PromptCache
    from preview import espeak, voice
    from preview.engine import PreviewEngine

PROMPT_TEXT = ("The quick brown fox jumps over the lazy dog near the river bank, "
               "while the farmer counts his sheep before the evening rain.")
TARGET = "Good morning everyone. Welcome to the preview of the voice studio, running on the CPU."
EDITS = (("speed", "faster"), ("emotion", "happy"), ("style", "whisper"), ("denoise", None), ("vad", None))


def make_prompt() -> Audio:
    speech = espeak.speak(PROMPT_TEXT, "en-gb-x-rp")
    base = resample(speech.samples, speech.sample_rate, voice.SAMPLE_RATE)
    params = voice.analyse(base)
    shifted = params.replace(f0=params.f0 * 2 ** (5 / 12), sp=voice.warp_envelope(params.sp, 1.1))
    out = voice.synthesize(shifted)
    return Audio(out / np.abs(out).max() * 0.5, voice.SAMPLE_RATE)


def table_tail(values_ms: list[float]) -> str:
    return f"| {cells(summary(values_ms), 0)} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args()

    prompt = make_prompt()
    lines = [environment_header("cpu", "float32", [f"eSpeak NG {espeak.version()}", f"prompt {prompt.duration:.1f} s",
                                                   f"runs {args.runs}"]), ""]
    with tempfile.TemporaryDirectory() as tmp:
        def engine_with_fresh_cache(i: int) -> PreviewEngine:
            settings = Settings(cache_dir=Path(tmp) / f"c{i}")
            return PreviewEngine(settings, PromptCache.from_settings(settings))

        engine_with_fresh_cache(-1).clone(prompt, PROMPT_TEXT, TARGET, seed=0)  # warm-up (imports, JIT)
        cold, cold_rtf = [], []
        for i in range(args.runs):
            start = time.perf_counter()
            result = engine_with_fresh_cache(i).clone(prompt, PROMPT_TEXT, TARGET, seed=i)
            cold.append((time.perf_counter() - start) * 1000)
            cold_rtf.append(result.timings.rtf)
        warm_engine = engine_with_fresh_cache(10_000)
        clip = warm_engine.clone(prompt, PROMPT_TEXT, TARGET, seed=0)
        warm, warm_rtf = [], []
        for i in range(args.runs):
            start = time.perf_counter()
            result = warm_engine.clone(prompt, PROMPT_TEXT, TARGET, seed=i)
            warm.append((time.perf_counter() - start) * 1000)
            warm_rtf.append(result.timings.rtf)
            assert "prompt_analysis" in result.cache_hits
        edits = {}
        for edit_type, info in EDITS:
            edits[(edit_type, info)] = []
            for i in range(args.runs):
                start = time.perf_counter()
                warm_engine.edit(clip.audio, clip.text, edit_type, info, seed=i)
                edits[(edit_type, info)].append((time.perf_counter() - start) * 1000)

    lines += [f"clone output {clip.audio.duration:.2f} s; stages of the last warm request: "
              + ", ".join(f"{k} {v:.0f} ms" + (" (hit)" if k in result.timings.cached else "")
                          for k, v in result.timings.stages_ms.items()), "",
              "| request | count | median ms | p90 ms | p99 ms | max ms |", "|---|---|---|---|---|---|",
              "| clone, prompt not cached (baseline) " + table_tail(cold),
              "| clone, prompt cached " + table_tail(warm)]
    lines += [f"| edit {t}{'/' + i if i else ''} " + table_tail(v) for (t, i), v in edits.items()]
    lines += ["", f"warm/cold median latency ratio: {np.median(warm) / np.median(cold):.2f} "
              f"(cached prompt is {np.median(cold) / np.median(warm):.2f}x faster); "
              f"median RTF cold {np.median(cold_rtf):.3f}, warm {np.median(warm_rtf):.3f}"]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
