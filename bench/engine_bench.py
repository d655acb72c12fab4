"""Benchmark: LLM request throughput and latency with batching on vs off.

Runs the engine's LLM path (``llm.batching.BatchScheduler`` -> ``llm.generation.generate_batch``,
i.e. left-padded batched generation with per-row seeds and the reference's sampling rules) with a
~100 M-parameter random-weight Llama-shaped model, closed-loop clients each sending requests one
after another. The tokenizer and decoder are left out: on a prompt-cache hit they cost a hash
and a lookup, and token2wav runs per request outside the LLM scheduler.

Reports, per number of concurrent clients: requests, requests/s, per-request latency (median,
p90, p99, max; no means), and the batching-on / batching-off throughput ratio measured in the
same process. A warm-up batch is run and not counted.

Usage:
    .venv/bin/python bench/engine_bench.py [--device auto] [--clients 1,2,4,8] [--requests 3]
        [--new-tokens 40] [--prompt-tokens 300] [--window-ms 15] [--max-batch 8] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from common import environment_header, summary


from core.devices import configure_tf32, resolve_device, resolve_dtype
from llm.batching import BatchScheduler
from llm.generation import GenerationRequest, generate_batch
from llm.loader import load_llm
from llm.sampling import SamplingConfig


def make_prompt(rng: np.random.Generator, n: int) -> tuple[int, ...]:
    """A clone-shaped prompt: special ids, some text ids, then ``<audio_N>`` ids in 2:3 groups."""
    text = rng.integers(10, 400, size=n // 4).tolist()
    audio = []
    while len(audio) < n - len(text) - 8:
        audio += rng.integers(65536, 66560, 2).tolist() + rng.integers(66560, 70656, 3).tolist()
    head = ([1, 4] + text + audio)[:n - 6]
    return tuple(head + [3, 4, 300, 3, 4, 301])   # ends like "...[3][4] assistant\n", never on the pad id


def run_clients(llm, config, clients: int, per_client: int, window_s: float, max_batch: int,
                prompts: list[tuple[int, ...]]) -> tuple[list[float], float, list[int]]:
    """Closed loop: ``clients`` threads each send ``per_client`` requests. Returns latencies (s),
    wall time (s), and the batch sizes the scheduler formed."""
    sched = BatchScheduler(lambda batch: generate_batch(llm, batch, config), window_s, max_batch)
    sched.run_many([GenerationRequest(p, 0) for p in prompts[:max_batch]])   # warm-up, not counted
    sched.run(GenerationRequest(prompts[0], 0))
    warm_batches = len(sched.batch_sizes)
    latencies: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def client(c: int) -> None:
        barrier.wait()
        for i in range(per_client):
            start = time.perf_counter()
            sched.run(GenerationRequest(prompts[(c * per_client + i) % len(prompts)], 1000 * c + i))
            with lock:
                latencies.append(time.perf_counter() - start)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    sizes = sched.batch_sizes[warm_batches:]
    sched.close()
    return latencies, wall, sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--clients", default="1,2,4,8")
    parser.add_argument("--requests", type=int, default=3, help="requests per client")
    parser.add_argument("--new-tokens", type=int, default=40)
    parser.add_argument("--prompt-tokens", type=int, default=300)
    parser.add_argument("--window-ms", type=float, default=15.0)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=640)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    parser.add_argument("--markdown", type=Path, help="also write the result table to this file")
    args = parser.parse_args()

    from testkit.tiny_models import build_tiny_llm

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    configure_tf32(True)
    folder = Path(tempfile.mkdtemp(prefix="engine-bench-"))
    build_tiny_llm(folder, hidden=args.hidden, layers=args.layers, heads=args.hidden // 64, kv_heads=2,
                   intermediate=int(args.hidden * 2.7))
    llm = load_llm(folder, device, dtype, trust_remote_code=False)
    config = SamplingConfig(top_k=llm.top_k, top_p=llm.top_p, max_new_tokens=args.new_tokens,
                            min_new_tokens=args.new_tokens)
    rng = np.random.default_rng(0)
    prompts = [make_prompt(rng, args.prompt_tokens + int(rng.integers(-30, 30))) for _ in range(16)]
    header = environment_header(device, dtype, [
        f"LLM {llm.parameters / 1e6:.1f} M params (Llama, hidden {args.hidden}, {args.layers} layers)",
        f"prompt ~{args.prompt_tokens} ids", f"{args.new_tokens} new tokens",
        f"window {args.window_ms:g} ms, max batch {args.max_batch}"])
    print(header, flush=True)
    steps = ["| batch | decode ms/step | of which sampling ms/step | prefill ms |", "|---|---|---|---|"]
    for batch in (1, 2, 4, 8):
        reqs = [GenerationRequest(prompts[i], i) for i in range(batch)]
        runs = [generate_batch(llm, reqs, config)[0] for _ in range(4)][1:]   # first run is warm-up
        med = lambda xs: float(np.median(xs))  # noqa: E731
        steps.append(f"| {batch} | {med([r.decode_ms / max(1, r.steps - 1) for r in runs]):.2f} | "
                     f"{med([r.sampling_ms / r.steps for r in runs]):.2f} | {med([r.prefill_ms for r in runs]):.1f} |")
        print(steps[-1], flush=True)
    reqs = [GenerationRequest(prompts[i], 500 + i) for i in range(8)]
    batched = generate_batch(llm, reqs, config)
    alone = [generate_batch(llm, [r], config)[0] for r in reqs]
    same = sum(b.answer == a.answer for b, a in zip(batched, alone))
    equality = f"batched vs unbatched (8 rows, same seeds): {same}/8 answers identical"
    print(equality, flush=True)
    rows = ["| clients | batching | requests | req/s | latency median (s) | p90 | p99 | max | batch sizes | "
            "req/s on/off |", "|---|---|---|---|---|---|---|---|---|---|"]
    for clients in [int(c) for c in args.clients.split(",")]:
        result = {}
        for mode, window, max_batch in (("off", 0.0, 1), ("on", args.window_ms / 1000.0, args.max_batch)):
            lat, wall, sizes = run_clients(llm, config, clients, args.requests, window, max_batch, prompts)
            rps = len(lat) / wall
            result[mode] = rps
            ratio = f"{result['on'] / result['off']:.2f}x" if mode == "on" else ""
            s = summary(lat)   # seconds
            row = (f"| {clients} | {mode} | {s['count']} | {rps:.2f} | {s['median']:.3f} | {s['p90']:.3f} | "
                   f"{s['p99']:.3f} | {s['max']:.3f} | {','.join(map(str, sizes))} | {ratio} |")
            rows.append(row)
            print(row, flush=True)
    if args.markdown:
        sections = [header, "\n".join(steps), equality, "\n".join(rows)]
        args.markdown.write_text("\n\n".join(sections) + "\n")


if __name__ == "__main__":
    main()
