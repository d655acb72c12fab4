"""Benchmark: time to first audio (TTFA) and total time, streamed vs not, at 1 / 4 / 8 concurrent streams.

Builds the shipped-size decoder with seeded random weights (as ``bench/decoder_bench.py``), a 4.66 s
prompt (the fixture clip's mel, 38 random token groups), and a SYNTHETIC token source standing in
for the LLM: an ``LLMBackend`` whose streams put random valid audio ids from a thread, all at once
by default (``--ids-per-s 0``: a fast LLM), so that the numbers describe the decoder side alone
(the native Step1 backend streams its ids as sampled; its own speed is bench/llm_bench.py's). The streamed path is
the engine's own (``tts_engine.streaming.stream_answers``: id filter, ``DecodeSession`` chunks, seam
fader); the non-streamed path is ``AudioDecoder.token2wav`` on the same ids, as ``_generate`` does.
TTFA of a non-streamed request is its total. The prompt state is built once (its time is
reported) and then served from the decoder's cache, as for a stored voice.

Each repeat runs non-streamed then streamed (A, B, A, B, ...), so load from other jobs drifts over
both alike; rows give medians over the repeats, and the ratios are of medians measured in the same
process. The load average is printed at the start and the end (a loaded run shows as such).
The issue-27 targets (CPU): 15 s and 30 s, one stream: streamed total <= 1.10x, TTFA <= 10 % of
the non-streamed total; 4 streams of 8 s: <= 1.05x:

    PYTHONPATH=$PWD .venv/bin/python bench/streaming_bench.py --seconds 15,30 --concurrency 1,4 \
        --concurrency-seconds 8 --repeats 3 --threads 2

    PYTHONPATH=$PWD .venv/bin/python bench/streaming_bench.py [--seconds 5,15,30] [--concurrency 1,4,8]
        [--concurrency-seconds 5] [--steps 10] [--repeats 1] [--threads 2] [--ids-per-s 0]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from decoder_bench import build_folder

from common import ROOT, environment_header, mixed_tokens
from core.audio_io import load_audio
from core.audio_tokens import AUDIO_ID_OFFSET
from core.timings import Timer
from decoder.model import AudioDecoder
from decoder.streaming import StreamingDecoder
from llm.backend import GenerationOutput, GenerationStream, LLMBackend
from tts_engine.contract import CancelToken, CloneOptions
from tts_engine.streaming import stream_answers

FIXTURES = ROOT / "tests" / "fixtures"
EOS = 2


class SyntheticBackend(LLMBackend):
    """Answers every request with the ids it was given for it (``plan[seed]``), put from a thread at
    ``ids_per_s`` (0: all at once), then EOS."""

    name = "synthetic"

    def __init__(self, plan: dict[int, list[int]], ids_per_s: float) -> None:
        self.plan = plan
        self.ids_per_s = ids_per_s

    def submit(self, request):
        stream = GenerationStream(request)
        ids = self.plan[request.seed]

        def run():
            start = time.perf_counter()
            for i, token_id in enumerate(ids):
                if stream.cancelled:
                    break
                if self.ids_per_s:
                    delay = start + (i + 1) / self.ids_per_s - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                stream.put(token_id)
            stream.finish(GenerationOutput(tuple(ids), 0.0, (time.perf_counter() - start) * 1000.0, 1,
                                           cancelled=stream.cancelled))

        threading.Thread(target=run, daemon=True).start()
        return stream

    def encode(self, text: str) -> list[int]:
        return []

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return (EOS,)


def run_streamed(streamer, backend, bundle, seed: int, steps: int) -> tuple[float, float, int]:
    """(ttfa ms, total ms, samples) of one streamed request through the engine's streaming path."""
    timer = Timer()
    start = time.perf_counter()
    gen = stream_answers(backend=backend, streamer=streamer, prompts=[[1]], bundle=bundle, seed=seed,
                         options=CloneOptions(flow_steps=steps), timer=timer, text="", token=CancelToken(),
                         fade_ms=30.0)
    first, samples = None, 0
    for audio in gen:
        first = first if first is not None else (time.perf_counter() - start) * 1000.0
        samples += audio.samples.size
    return first, (time.perf_counter() - start) * 1000.0, samples


def run_whole(decoder, bundle, tokens: list[int], seed: int, steps: int) -> tuple[float, float, int]:
    start = time.perf_counter()
    wav = decoder.token2wav(tokens, bundle.tokens.mixed, bundle.features, seed=seed, n_steps=steps).samples
    total = (time.perf_counter() - start) * 1000.0
    return total, total, wav.size


def concurrent(fn, n: int) -> list[tuple[float, float, int]]:
    out: list = [None] * n
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, fn(i))) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", default="5,15,30", help="speech lengths for the single-stream table")
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--concurrency-seconds", type=float, default=5.0, help="speech length per concurrent stream")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--ids-per-s", type=float, default=0.0, help="synthetic LLM rate (0: all ids at once)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(environment_header("cpu", "float32", [f"steps {args.steps}", f"repeats {args.repeats}",
                                                 f"synthetic ids/s {args.ids_per_s or 'instant'}"]))
    print(f"load average at start: {_load()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        build_folder(Path(tmp))
        decoder = AudioDecoder.from_dir(tmp, n_steps=args.steps)
    rng = np.random.default_rng(0)
    features = decoder.prompt_features(load_audio(FIXTURES / "prompt_22k.wav"))
    prompt = mixed_tokens(38, rng)
    bundle = SimpleNamespace(digest="bench", tokens=SimpleNamespace(mixed=prompt), features=features)
    streamer = StreamingDecoder(decoder)
    plan: dict[int, list[int]] = {}

    def tokens_for(seed: int, seconds: float) -> list[int]:
        ids = mixed_tokens(int(round(seconds / 0.12)), np.random.default_rng(seed))
        plan[seed] = [t + AUDIO_ID_OFFSET for t in ids] + [EOS]
        return ids

    backend = SyntheticBackend(plan, args.ids_per_s)
    run_whole(decoder, bundle, tokens_for(999, 1.0), 999, args.steps)          # warm-up (first touch of weights)
    start = time.perf_counter()
    streamer.prompt_state("bench", prompt, features.mel, features.embedding, n_steps=args.steps)
    print(f"prompt state (4.56 s prompt, built once per voice and step count, then cached): "
          f"{time.perf_counter() - start:.2f} s, {streamer.stats()['bytes'] / 2**20:.0f} MiB")
    run_streamed(streamer, backend, bundle, 999, args.steps)

    print(f"chunk schedule (token frames): {', '.join(map(str, streamer.config.chunk_frames))} (the last repeats)")
    print("\n| speech s | streams | mode | TTFA ms (median) | total ms (median) | TTFA / non-streamed total | "
          "total / non-streamed total |")
    print("|---|---|---|---|---|---|---|")
    cases = [(float(s), 1) for s in args.seconds.split(",") if s]
    cases += [(args.concurrency_seconds, int(n)) for n in args.concurrency.split(",") if int(n) > 1]
    for seconds, n in cases:
        whole_runs, stream_runs = [], []
        for rep in range(args.repeats):
            seeds = [1000 * rep + 10 * n + i for i in range(n)]
            token_lists = {s: tokens_for(s, seconds) for s in seeds}
            whole_runs += concurrent(lambda i, seeds=seeds, lists=token_lists: run_whole(
                decoder, bundle, lists[seeds[i]], seeds[i], args.steps), n)
            stream_runs += concurrent(lambda i, seeds=seeds: run_streamed(streamer, backend, bundle, seeds[i],
                                                                          args.steps), n)
        assert all(w[2] == s[2] for w, s in zip(whole_runs, stream_runs)), "streamed length differs"
        base = float(np.median([w[1] for w in whole_runs]))
        for mode, runs in (("non-streamed", whole_runs), ("streamed", stream_runs)):
            ttfa, total = float(np.median([r[0] for r in runs])), float(np.median([r[1] for r in runs]))
            print(f"| {seconds:g} | {n} | {mode} | {ttfa:.0f} | {total:.0f} | {ttfa / base:.3f} | {total / base:.2f} |",
                  flush=True)
    print(f"\nload average at end: {_load()}")


def _load() -> str:
    """The 1, 5 and 15 minute load averages (the machine may be shared)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
