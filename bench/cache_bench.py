"""Benchmark of the prompt cache (funasr_cache): key hashing, hash + lookup, put/get, index build, eviction.

Run from the repository root:  .venv/bin/python bench/cache_bench.py [--sizes 1000 10000 100000] [--dir DIR]

Clip: 10 s of 48 kHz float32 noise (480,000 samples, 1.92 MB). Entries look like the real ones:
"tokens" holds vq02 (167 ids, 16.7 Hz) and vq06 (250 ids, 25 Hz) in the JSON; "prompt_features"
adds an 80 x 500 float32 mel and a 192-d speaker embedding in the safetensors sidecar.

Baseline (same process, same clip): the seed's key, BLAKE2b over ``str(rate)`` + ``samples.tobytes()``
(a 1.92 MB copy first). Index build writes entry files straight into the real layout (no fsync, so
that 100k entries take seconds, not minutes) and times ``PromptCache(root)``: a directory scan.
Timings are per operation, in ms: count, median, p90, p99, max (no means).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from common import ROOT, environment_header, interleaved, repeat_ms, summary
from funasr_cache import store as fc
from funasr_cache.store import PromptCache, audio_digest

NS = fc.make_namespace("Step-Audio-Tokenizer", "0123456789abcdef", 1)


def row(name: str, ms: list[float], baseline: dict | None = None) -> str:
    s = summary(ms)
    ratio = f"{baseline['median'] / s['median']:.2f}x" if baseline else ""
    return f"| {name} | {s['count']} | {s['median']:.3f} | {s['p90']:.3f} | {s['p99']:.3f} | {s['max']:.3f} | {ratio} |"


def seed_digest(samples: np.ndarray, rate: int) -> str:
    h = hashlib.blake2b(digest_size=32)
    h.update(str(int(rate)).encode())
    h.update(np.ascontiguousarray(samples, dtype="<f4").tobytes())
    return h.hexdigest()


def key(i: int) -> str:
    return hashlib.sha256(f"bench-{i}".encode()).hexdigest()


def token_payload(rng) -> dict:
    return {"vq02": rng.integers(0, 1024, 167).tolist(), "vq06": rng.integers(0, 4096, 250).tolist()}


def feature_arrays(rng) -> dict:
    return {"mel": rng.standard_normal((80, 500)).astype(np.float32),
            "spk": rng.standard_normal(192).astype(np.float32)}


def write_fake_entries(root: Path, n: int) -> None:
    """n valid token entries in the real layout, written without fsync (bench set-up only)."""
    root.mkdir(parents=True)
    folder = root / PromptCache(root)._folder("tokens", NS, "0" * 64)  # the real folder name for this namespace
    folder.mkdir()
    (folder / "namespace.json").write_text(json.dumps({"kind": "tokens", "namespace": NS}))
    payload = {"vq02": list(range(167)), "vq06": list(range(250))}
    for i in range(n):
        digest = key(i)
        shard = folder / digest[:2]
        shard.mkdir(exist_ok=True)
        doc = {"format": 1, "kind": "tokens", "namespace": NS, "digest": digest, "payload": payload,
               "cost_s": 0.5, "created_at": time.time(), "arrays": None}
        (shard / f"{digest}.json").write_text(json.dumps(doc, sort_keys=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--dir", type=Path, default=None, help="where to build caches (default: a temp dir)")
    parser.add_argument("--n", type=int, default=200, help="repetitions per timing")
    args = parser.parse_args()
    # the header's +dirty covers the whole tree; this says whether the cache code itself changed
    dirty = subprocess.run(["git", "status", "--porcelain", "prompt_cache"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    print(environment_header("cpu", "float32 samples", [f"python {platform.python_version()}"]
                             + (["cache modules modified"] if dirty else [])))
    base = Path(tempfile.mkdtemp(dir=args.dir))
    fs = subprocess.run(["df", "-T", str(base)], capture_output=True, text=True).stdout.splitlines()[-1].split()[1]
    print(f"cache folders under {base} ({fs}); load average {os.getloadavg()[0]:.1f} at start\n")
    rng = np.random.default_rng(0)
    clip = rng.standard_normal(480_000).astype(np.float32)
    n = args.n
    header = "| operation | count | median ms | p90 ms | p99 ms | max ms | speed vs baseline |\n|---|---|---|---|---|---|---|"

    cache = PromptCache(base / "main", memory_entries=256)
    cold = PromptCache(base / "main", memory_entries=0)
    digest = audio_digest(clip, 48000)
    cache.put("tokens", NS, digest, token_payload(rng), 0.5)
    cache.put("prompt_features", NS, digest, token_payload(rng), 0.5, feature_arrays(rng))
    runs = interleaved({
        "baseline: seed key (BLAKE2b of a tobytes() copy)": lambda: seed_digest(clip, 48000),
        "BLAKE2b-256, no copy": lambda: hashlib.blake2b(memoryview(clip).cast("B"), digest_size=32).hexdigest(),
        "SHA-256, no copy": lambda: hashlib.sha256(memoryview(clip).cast("B")).hexdigest(),
        "audio_digest (SHA-256, no copy)": lambda: audio_digest(clip, 48000),
        "audio_digest + get, RAM hit (tokens)": lambda: cache.get("tokens", NS, audio_digest(clip, 48000)),
        "audio_digest + get, disk hit (tokens)": lambda: cold.get("tokens", NS, audio_digest(clip, 48000)),
        "audio_digest + get, disk hit (prompt_features, 160 kB sidecar)":
            lambda: cold.get("prompt_features", NS, audio_digest(clip, 48000)),
        "audio_digest + get, miss": lambda: cold.get("tokens", "other", audio_digest(clip, 48000)),
    }, n, warmup=3)
    seed = summary(runs["baseline: seed key (BLAKE2b of a tobytes() copy)"])
    print("## Key hashing and hash + lookup, 10 s of 48 kHz audio (all rows interleaved)\n\n" + header)
    for name, ms in runs.items():
        print(row(name, ms, seed))

    print("\n## get and put, one entry at a time\n\n" + header)
    print(row("get, RAM hit (tokens)", repeat_ms(lambda: cache.get("tokens", NS, digest), n, warmup=3)))
    print(row("get, disk hit (tokens)", repeat_ms(lambda: cold.get("tokens", NS, digest), n, warmup=3)))
    counter = iter(range(10**9))
    payload, arrays = token_payload(rng), feature_arrays(rng)
    puts_tok = repeat_ms(lambda: cache.put("tokens", NS, key(next(counter)), payload, 0.5), min(n, 100), warmup=3)
    puts_feat = repeat_ms(lambda: cache.put("prompt_features", NS, key(next(counter)), payload, 0.5, arrays),
                          min(n, 100), warmup=3)
    print(row("put (tokens: JSON only, 1 fsync)", puts_tok))
    print(row("put (prompt_features: 160 kB sidecar + JSON, 2 fsyncs)", puts_feat))

    print("\n## Eviction: put into a full cache (each put evicts the LRU entry) vs a non-full one, interleaved\n\n" + header)
    roomy = PromptCache(base / "roomy", max_entries=10**6)
    full = PromptCache(base / "full", max_entries=100)
    for i in range(100):
        full.put("tokens", NS, key(10**6 + i), payload, 0.5)
    evict_runs = interleaved({"roomy": lambda: roomy.put("tokens", NS, key(next(counter)), payload, 0.5),
                              "full": lambda: full.put("tokens", NS, key(next(counter)), payload, 0.5)},
                             min(n, 100), warmup=3)
    roomy_ms, evicting = evict_runs["roomy"], evict_runs["full"]
    not_full = summary(roomy_ms)
    print(row("baseline: put, no eviction", roomy_ms, not_full))
    print(row("put + evict 1", evicting, not_full))
    assert len(full) == 100 and full.stats()["evictions"] >= min(n, 100)

    print("\n## Index build at start-up (directory scan, no payload read)\n")
    print("| entries | build runs | median s | max s | another process re-reads the journal, median s | index RAM, bytes/entry |\n"
          "|---|---|---|---|---|---|")
    for size in args.sizes:
        root = base / f"index{size}"
        write_fake_entries(root, size)
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            first = PromptCache(root, max_entries=10**7, max_bytes=10**12)
            runs.append(time.perf_counter() - start)
        rereads = []
        for _ in range(3):
            PromptCache(root, max_entries=10**7, max_bytes=10**12)  # rewrites the journal: `first` must re-read it
            start = time.perf_counter()
            assert len(first) == size
            rereads.append(time.perf_counter() - start)
        reread = float(np.median(rereads))
        del first
        tracemalloc.start()
        held = PromptCache(root, max_entries=10**7, max_bytes=10**12)
        per_entry = tracemalloc.get_traced_memory()[0] / size
        tracemalloc.stop()
        del held
        print(f"| {size} | {len(runs)} | {np.median(runs):.3f} | {max(runs):.3f} | {reread:.3f} | {per_entry:.0f} |")
        shutil.rmtree(root, ignore_errors=True)
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
