"""Load test: many concurrent API clients against a real studio process (preview engine).

Starts ``python app.py --engine preview`` on 127.0.0.1 (``testkit.studio_server.start_studio_process``)
and drives it with ``--clients`` concurrent clients for ``--duration`` seconds, each looping over a
mix of requests: clones (speech with a stored voice), voice uploads (new clips), edits (speed,
denoise), cache stats, voice lists and bad requests (unknown voice, empty input, a non-audio upload,
an over-limit body). Reports requests/s, p50/p99/max latency per kind, the status counts (5xx must be
0) and the server's memory (VmRSS) before and after, and VmHWM (peak).

    PYTHONPATH=$PWD .venv/bin/python bench/load_bench.py --clients 50 --duration 120
"""

from __future__ import annotations

import argparse
import collections
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from common import environment_header, inline, summary

from testkit.studio_server import speech_wav, start_studio_process

LIMIT = 2_000_000
TEXTS = ["Hello there.", "The boats went out at dawn.", "A short sentence to speak.", "Numbers like 42 too."]


def one_request(client: httpx.Client, rng: random.Random, voices: list[str], wav: bytes) -> tuple[str, int]:
    kind = rng.choices(["clone", "upload", "edit", "stats", "list", "bad"], weights=[35, 10, 15, 15, 10, 15])[0]
    if kind == "clone":
        r = client.post("/v1/audio/speech", json={"input": rng.choice(TEXTS), "voice": rng.choice(voices),
                                                  "response_format": rng.choice(["wav", "mp3"]), "seed": 1})
    elif kind == "upload":
        clip = speech_wav(seconds=1.0 + rng.random(), seed=rng.randrange(10**6))
        r = client.post("/v1/audio/voices", files={"file": ("v.wav", clip, "audio/wav")},
                        data={"transcript": "a load test hum"})
        if r.status_code == 201 and len(voices) < 200:
            voices.append(r.json()["id"])
    elif kind == "edit":
        edit = rng.choice([("speed", "faster"), ("denoise", None), ("speed", "slower")])
        r = client.post("/v1/audio/edits", files={"file": ("e.wav", wav, "audio/wav")},
                        data={"edit_type": edit[0], **({"edit_info": edit[1]} if edit[1] else {}),
                              "audio_text": "a hum"})
    elif kind == "stats":
        r = client.get("/v1/cache/stats")
    elif kind == "list":
        r = client.get("/v1/audio/voices")
    else:
        bad = rng.choice(["voice", "empty", "garbage", "huge"])
        if bad == "voice":
            r = client.post("/v1/audio/speech", json={"input": "x", "voice": "no-such-voice"})
        elif bad == "empty":
            r = client.post("/v1/audio/speech", json={"input": "  ", "voice": rng.choice(voices)})
        elif bad == "garbage":
            r = client.post("/v1/audio/voices", files={"file": ("x.wav", rng.randbytes(5000), "audio/wav")},
                            data={"transcript": "x"})
        else:
            r = client.post("/v1/audio/voices", content=(b"\0" * 65536 for _ in range(3 * LIMIT // 65536)),
                            headers={"Content-Type": "multipart/form-data; boundary=b"})
        kind = f"bad:{bad}"
    return kind, r.status_code


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of load (120 for the full run)")
    args = parser.parse_args(argv)
    print(environment_header(extra=[f"clients={args.clients}", f"duration={args.duration:g}s", "engine=preview"]))
    with tempfile.TemporaryDirectory() as tmp:
        studio = start_studio_process(Path(tmp), "--max-upload-bytes", str(LIMIT), "--log-level", "WARNING",
                                      "--concurrency-limit", "2")
        try:
            with httpx.Client(base_url=studio.url, timeout=300) as client:
                voices = []
                for seed in range(3):
                    r = client.post("/v1/audio/voices", files={"file": ("v.wav", speech_wav(seed=seed), "audio/wav")},
                                    data={"transcript": "a load test hum"})
                    r.raise_for_status()
                    voices.append(r.json()["id"])
                wav = client.post("/v1/audio/speech", json={"input": "Edit me.", "voice": voices[0],
                                                            "response_format": "wav"}).content
            rss_before = studio.rss_kib()
            latencies: dict[str, list[float]] = collections.defaultdict(list)
            statuses: collections.Counter = collections.Counter()
            errors: collections.Counter = collections.Counter()
            lock = threading.Lock()
            deadline = time.monotonic() + args.duration

            def client_loop(index: int) -> None:
                rng = random.Random(index)
                with httpx.Client(base_url=studio.url, timeout=300) as c:
                    while time.monotonic() < deadline:
                        started = time.perf_counter()
                        try:
                            kind, status = one_request(c, rng, voices, wav)
                        except httpx.HTTPError as exc:
                            with lock:
                                errors[type(exc).__name__] += 1
                            continue
                        with lock:
                            latencies[kind].append((time.perf_counter() - started) * 1000)
                            statuses[status] += 1

            started = time.perf_counter()
            threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(args.clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - started
            rss_after, hwm = studio.rss_kib(), studio.rss_kib("VmHWM")
            total = sum(statuses.values())
            every = [ms for values in latencies.values() for ms in values]
            print(f"requests={total} in {elapsed:.1f} s: {total / elapsed:.1f} req/s; all: {inline(summary(every), 0)}")
            for kind in sorted(latencies):
                print(f"  {kind:12s} {inline(summary(latencies[kind]), 0)}")
            print("status counts: " + ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())))
            print("client errors: " + (", ".join(f"{k}: {v}" for k, v in errors.items()) or "none"))
            fives = sum(v for k, v in statuses.items() if k >= 500)
            print(f"5xx: {fives}")
            print(f"server memory: VmRSS {rss_before / 1024:.0f} MiB before, {rss_after / 1024:.0f} MiB after "
                  f"(+{(rss_after - rss_before) / 1024:.0f} MiB); peak VmHWM {hwm / 1024:.0f} MiB")
            tracebacks = studio.log().count("Traceback")
            print(f"tracebacks in the server log: {tracebacks}")
            return 1 if fives or tracebacks else 0
        finally:
            studio.stop()


if __name__ == "__main__":
    sys.exit(main())
