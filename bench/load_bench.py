"""Load test: many concurrent API clients against a real studio process (preview engine).

Starts ``python app.py --engine preview`` on 127.0.0.1 (``testkit.studio_server.start_studio_process``)
and drives it with ``--clients`` concurrent clients for ``--duration`` seconds, each looping over a
mix of requests: clones (speech with a stored voice), voice uploads (new clips), edits (speed,
denoise), cache stats, voice lists and bad requests (unknown voice, empty input, a non-audio upload,
an over-limit body). Reports requests/s, p50/p99/max latency per kind, the status counts (5xx must be
0) and the server's memory (VmRSS) before and after, and VmHWM (peak).

    PYTHONPATH=$PWD .venv/bin/python bench/load_bench.py --clients 50 --duration 120

``--scenario overload`` (issue 21): ``--clients`` (100) speech clients against a small admission limit
(``--max-engine-requests``, 4), each doing at most ``--requests`` requests and pausing only 0.1 s after
a 503 (harder than a client that honours ``Retry-After``), while a prober GETs ``/healthz`` every
0.1 s. Pass: no answer other than 200 or 503/429 with ``Retry-After``, no client error, ``/healthz``
p99 under 1 s, and the server's memory bounded (reported). The machine load is printed at start
and end (``os.getloadavg()``).

    PYTHONPATH=$PWD .venv/bin/python bench/load_bench.py --scenario overload --clients 100 --requests 10
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import os
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


def _probe_healthz(url: str, stop, results) -> None:
    """GET /healthz every 0.1 s until ``stop``; puts (latencies in ms, failures) on ``results``."""
    latencies, failures = [], 0
    with httpx.Client(base_url=url, timeout=30) as c:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                ok = c.get("/healthz").status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies.append((time.perf_counter() - started) * 1000)
            failures += not ok
            time.sleep(0.1)
    results.put((latencies, failures))


def overload(args) -> int:
    """The overload scenario (see the module docstring); returns the exit code."""
    print(environment_header(extra=[f"clients={args.clients}", f"requests<={args.requests}/client",
                                    f"max_engine_requests={args.max_engine_requests}", "engine=preview"]))
    print("load average at start: %.2f %.2f %.2f" % os.getloadavg())
    with tempfile.TemporaryDirectory() as tmp:
        studio = start_studio_process(Path(tmp), "--log-level", "WARNING", "--max-engine-requests",
                                      str(args.max_engine_requests))
        try:
            with httpx.Client(base_url=studio.url, timeout=300) as client:
                r = client.post("/v1/audio/voices", files={"file": ("v.wav", speech_wav(), "audio/wav")},
                                data={"transcript": "an overload hum"})
                r.raise_for_status()
                voice = r.json()["id"]
                client.post("/v1/audio/speech", json={"input": TEXTS[0], "voice": voice}).raise_for_status()
                idle_ms = []   # the baseline: /healthz on the idle server, same process
                for _ in range(30):
                    t0 = time.perf_counter()
                    client.get("/healthz").raise_for_status()
                    idle_ms.append((time.perf_counter() - t0) * 1000)
                    time.sleep(0.02)
            rss_before = studio.rss_kib()
            statuses: collections.Counter = collections.Counter()
            bad: collections.Counter = collections.Counter()
            ok_ms: list[float] = []
            lock = threading.Lock()

            def client_loop(index: int) -> None:
                rng = random.Random(index)
                with httpx.Client(base_url=studio.url, timeout=120) as c:
                    for _ in range(args.requests):
                        started = time.perf_counter()
                        try:
                            r = c.post("/v1/audio/speech", json={"input": rng.choice(TEXTS), "voice": voice,
                                                                "response_format": "wav", "seed": 1})
                        except httpx.HTTPError as exc:
                            with lock:
                                bad[type(exc).__name__] += 1
                            continue
                        with lock:
                            statuses[r.status_code] += 1
                            if r.status_code == 200:
                                ok_ms.append((time.perf_counter() - started) * 1000)
                            elif r.status_code not in (503, 429) or "retry-after" not in r.headers:
                                bad[f"HTTP {r.status_code}"] += 1
                        if r.status_code != 200:
                            time.sleep(0.1)

            # The prober is a process of its own: in this one, 100 client threads would make it wait for
            # the GIL, and that wait would be counted as the server's latency.
            results = multiprocessing.get_context("fork").Queue()
            stop = multiprocessing.get_context("fork").Event()
            prober = multiprocessing.get_context("fork").Process(target=_probe_healthz, args=(studio.url, stop, results))
            prober.start()
            started = time.perf_counter()
            threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(args.clients)]
            for t in threads:
                t.start()
            peak = rss_before
            while any(t.is_alive() for t in threads):
                peak = max(peak, studio.rss_kib())
                time.sleep(0.2)
            elapsed = time.perf_counter() - started
            stop.set()
            health_ms, failures = results.get(timeout=60)
            prober.join(30)
            if failures:
                bad["healthz failed"] += failures
            rss_after, hwm = studio.rss_kib(), studio.rss_kib("VmHWM")
            total = sum(statuses.values())
            health = summary(health_ms)
            print(f"requests={total} in {elapsed:.1f} s: {total / elapsed:.1f} req/s")
            print("status counts: " + ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())))
            print(f"200 latency: {inline(summary(ok_ms), 0)}")
            idle = summary(idle_ms)
            print(f"/healthz idle (baseline): {inline(idle, 1)}")
            print(f"/healthz during the load: {inline(health, 1)}; p99 ratio to idle {health['p99'] / idle['p99']:.1f}x")
            print("errors (not 200, not 503/429 with Retry-After): " +
                  (", ".join(f"{k}: {v}" for k, v in bad.items()) or "none"))
            print(f"server memory: VmRSS {rss_before / 1024:.0f} MiB before, {rss_after / 1024:.0f} MiB after, "
                  f"sampled peak {peak / 1024:.0f} MiB; VmHWM {hwm / 1024:.0f} MiB")
            tracebacks = studio.log().count("Traceback")
            print(f"tracebacks in the server log: {tracebacks}")
            print("load average at end: %.2f %.2f %.2f" % os.getloadavg())
            return 1 if bad or tracebacks or health["p99"] >= 1000 else 0
        finally:
            studio.stop()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=("mix", "overload"), default="mix")
    parser.add_argument("--clients", type=int, default=None, help="concurrent clients (mix: 50, overload: 100)")
    parser.add_argument("--duration", type=float, default=120.0, help="mix: seconds of load (120 for the full run)")
    parser.add_argument("--requests", type=int, default=10, help="overload: most requests per client")
    parser.add_argument("--max-engine-requests", type=int, default=4, help="overload: the server's admission limit")
    args = parser.parse_args(argv)
    if args.scenario == "overload":
        args.clients = args.clients or 100
        return overload(args)
    args.clients = args.clients or 50
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
