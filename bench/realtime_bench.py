"""Benchmark: text streamed in at an LLM's rate over ``WS /v1/audio/speech/stream``: how soon each
segment's audio starts once its text is complete, and the gaps between segments.

A real studio (uvicorn on 127.0.0.1, in this process) and a real WebSocket client. The text is cut into
"tokens" of at most ``--chars-per-token`` characters (a leading space included, as LLM tokens are) and
sent at ``--tokens-per-s`` (30: a typical chat LLM). For each segment:

    engine_ttfa_ms  of after_text_ms, the engine's own time to the first chunk (the segment's timings)
    overhead_ms     after_text_ms - engine_ttfa_ms: the segmenter's wait, the WebSocket and thread hops
    after_text_ms   from sending the token that completes its text (the one with its final mark) to its
                    first audio frame; the segmenter's wait for the next character is part of it
    baseline_ms     the same text and seed as a plain ``POST /v1/audio/speech`` (whole file), timed in the
                    same process, interleaved with the sessions; the issue's target is
                    after_text_ms <= 1.2 x baseline_ms for the first segment
    gap_ms          (segments after the first) from the previous segment's last audio frame to this one's first
    stall_ms        how long a player that starts at the first frame and plays in real time would run dry
                    before this segment's first frame (0: the audio was there in time)

Engines: ``--engine preview`` (eSpeak NG + WORLD), ``--engine real``: the Step-Audio engine with the
shipped-size decoder (random weights, as bench/decoder_bench.py builds it) and a Step1 of the shipped width
(hidden 3072, 48 heads in 4 groups, vocabulary 74752) with random weights and ``--layers`` of its 32 layers
(memory), answers capped at ``--max-new`` ids; the tokenizer is the test fixture's (the voice's prompt work
is cached at session open, so it is not in any number).

    PYTHONPATH=$PWD .venv/bin/python bench/realtime_bench.py --engine preview --repeats 5
    PYTHONPATH=$PWD .venv/bin/python bench/realtime_bench.py --engine real --layers 2 --max-new 100 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
from websockets.sync.client import connect

from common import ROOT, environment_header, inline, summary
from testkit.studio_server import start_studio

TEXT = ("Thanks for calling, I can help with that. Your order left our warehouse this morning. "
        "It should arrive on Thursday before noon. Is there anything else I can do for you today?")
EXAMPLE = ROOT / "examples" / "en_low.flac"
EXAMPLE_TEXT = "The quiet harbour woke slowly as the first boats went out."
FIXTURE_PROMPT = ROOT / "tests" / "fixtures" / "prompt_22k.wav"
FIXTURE_TEXT = "The quick brown fox jumps over the lazy dog near the river bank."


def tokens(text: str, chars: int) -> list[str]:
    """LLM-like pieces: a leading space and up to ``chars`` other characters each."""
    return re.findall(r"\s?\S{1,%d}" % chars, text)


def run_session(url: str, voice: str, pieces: list[str], rate: float, seed: int) -> dict:
    """One session; per segment (index order): its spoken text, seed, when its text was complete, its first
    and last audio frame (perf_counter seconds), samples."""
    segments: dict[int, dict] = {}
    sent_at: list[tuple[int, float]] = []     # (characters sent so far, when)
    current = [None]

    with connect(url, max_size=None) as ws:
        ws.send(json.dumps({"type": "session.open", "voice": voice, "response_format": "pcm", "seed": seed}))

        def read():
            for message in ws:
                now = time.perf_counter()
                if isinstance(message, bytes):
                    seg = segments[current[0]]
                    seg.setdefault("first", now)
                    seg["last"] = now
                    continue
                event = json.loads(message)
                if event["type"] == "segment.start":
                    current[0] = event["index"]
                    segments[event["index"]] = {"spoken": event["spoken"], "seed": event["seed"],
                                                "end": event["end"], "text": event["text"]}
                elif event["type"] == "segment.end":
                    segments[event["index"]]["samples"] = event["samples"]
                    segments[event["index"]]["engine_ttfa"] = event["timings"]["counters"]["ttfa_ms"]
                elif event["type"] == "error":
                    raise RuntimeError(event)

        reader = threading.Thread(target=read)
        reader.start()
        start, sent = time.perf_counter(), 0
        for i, piece in enumerate(pieces):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            ws.send(json.dumps({"type": "text", "text": piece}))
            sent += len(piece)
            sent_at.append((sent, time.perf_counter()))
        ws.send(json.dumps({"type": "close"}))
        reader.join()
    for seg in segments.values():
        # The text is complete when the piece holding its last non-space character was sent.
        last_char = len(seg["text"].rstrip()) + seg["end"] - len(seg["text"])
        seg["complete"] = next(t for n, t in sent_at if n >= last_char)
    return segments


def measure(studio, voice: str, pieces: list[str], rate: float, repeats: int, http: httpx.Client) -> dict:
    url = studio.url.replace("http://", "ws://") + "/v1/audio/speech/stream"
    sample_rate = studio.engine.describe().sample_rate
    rows: dict[str, list[float]] = {"after_text_first": [], "engine_ttfa_first": [], "overhead_first": [],
                                    "baseline_first": [],
                                    "ratio_first": [],
                                    "after_text_later": [], "gap": [], "stall": []}
    for r in range(repeats):
        seed = 100 + r
        segs = run_session(url, voice, pieces, rate, seed)
        order = [segs[i] for i in sorted(segs)]
        # Baseline after the session (same process, same seed and text), so both see the same load.
        started = time.perf_counter()
        reply = http.post("/v1/audio/speech", json={"input": order[0]["spoken"], "voice": voice,
                                                     "seed": order[0]["seed"], "response_format": "pcm"})
        reply.raise_for_status()
        baseline = (time.perf_counter() - started) * 1000.0
        first = (order[0]["first"] - order[0]["complete"]) * 1000.0
        rows["after_text_first"].append(first)
        rows["engine_ttfa_first"].append(order[0]["engine_ttfa"])
        rows["overhead_first"].append(first - order[0]["engine_ttfa"])
        rows["baseline_first"].append(baseline)
        rows["ratio_first"].append(first / baseline)
        played_until = order[0]["first"]
        for prev, seg in zip(order, order[1:]):
            rows["after_text_later"].append(max(0.0, seg["first"] - seg["complete"]) * 1000.0)
            rows["gap"].append((seg["first"] - prev["last"]) * 1000.0)
            played_until += prev["samples"] / sample_rate
            rows["stall"].append(max(0.0, seg["first"] - played_until) * 1000.0)
            played_until = max(played_until, seg["first"])
        print(f"  run {r + 1}: {len(order)} segments " + " | ".join(repr(s["spoken"][:28]) for s in order), flush=True)
    return rows


def build_real_root(root: Path, layers: int) -> Path:
    """model_root with the fixture tokenizer, a shipped-width random Step1 and the shipped-size decoder."""
    from decoder_bench import build_folder

    from llm.checkpoint import write_step1_checkpoint
    from llm.step1 import Step1Config
    from testkit.paths import FIXTURES
    from testkit.tiny_models import build_tiny_tokenizer

    models = root / "models"
    shutil.copytree(FIXTURES / "tokenizer" / "Step-Audio-Tokenizer", models / "Step-Audio-Tokenizer")
    editx = models / "Step-Audio-EditX"
    editx.mkdir(parents=True)
    build_tiny_tokenizer(editx)
    config = Step1Config(hidden_size=3072, intermediate_size=8192, num_attention_heads=48, num_attention_groups=4,
                         num_hidden_layers=layers, vocab_size=74752, max_seq_len=8192)
    write_step1_checkpoint(editx, config, seed=0)
    decoder = editx / "CosyVoice-300M-25Hz"
    decoder.mkdir()
    build_folder(decoder)
    return models


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=["preview", "real"], default="preview")
    parser.add_argument("--tokens-per-s", type=float, default=30.0)
    parser.add_argument("--chars-per-token", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=2, help="real: Step1 layers (32 shipped)")
    parser.add_argument("--max-new", type=int, default=100, help="real: answer ids per segment")
    parser.add_argument("--flow-steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--text", default=TEXT)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    print(environment_header("cpu", "float32", [f"engine={args.engine}", f"torch_threads={torch.get_num_threads()}"]))
    print(f"load average at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f} "
          f"({os.cpu_count()} cores; the machine is shared)")
    work = Path(tempfile.mkdtemp(prefix="realtime-bench-"))
    try:
        if args.engine == "preview":
            studio = start_studio(work, None)
            clip, transcript = EXAMPLE, EXAMPLE_TEXT
        else:
            from tts_engine.step_audio import StepAudioEngine

            models = build_real_root(work, args.layers)
            studio = start_studio(work, StepAudioEngine, "--model-root", str(models), "--llm-max-new-tokens",
                                  str(args.max_new), "--flow-steps", str(args.flow_steps))
            clip, transcript = FIXTURE_PROMPT, FIXTURE_TEXT
        try:
            with httpx.Client(base_url=studio.url, timeout=600) as http:
                reply = http.post("/v1/audio/voices", files={"file": (clip.name, clip.read_bytes())},
                                  data={"transcript": transcript, "name": "bench"})
                reply.raise_for_status()
                voice = reply.json()["id"]
                pieces = tokens(args.text, args.chars_per_token)
                print(f"text: {len(args.text)} characters in {len(pieces)} tokens at {args.tokens_per_s:g} tokens/s "
                      f"({len(pieces) / args.tokens_per_s:.1f} s to send); {studio.engine.describe().detail}")
                measure(studio, voice, pieces[:12], args.tokens_per_s, 1, http)       # warm-up, not kept
                rows = measure(studio, voice, pieces, args.tokens_per_s, args.repeats, http)
        finally:
            studio.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("ms (count, median, p90, p99, max):")
    for name, values in rows.items():
        digits = 3 if name == "ratio_first" else 1
        print(f"  {name:18s} {inline(summary(values), digits)}")
    ratio = summary(rows["ratio_first"])["median"]
    of_medians = summary(rows["after_text_first"])["median"] / summary(rows["baseline_first"])["median"]
    print(f"first segment: audio {ratio:.2f} x its non-streamed generation time after its text was complete "
          f"(median of per-run ratios; {of_medians:.2f} as a ratio of the medians; target <= 1.20: "
          f"{'met' if max(ratio, of_medians) <= 1.2 else 'NOT met'})")
    load_end = os.getloadavg()
    print(f"load average at end: {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
