"""Benchmark: the native Step1 decode loop vs transformers.generate, and continuous vs static batching.

Part 1 (``--part single``): a Step1 with the shipped dimensions and random weights (hidden 3072,
intermediate 8192, 48 heads in 4 groups, vocabulary 74752: vLLM's Step1Config defaults, which the
golden README section 8 and the mlx-speech port's notes on the shipped config.json agree on; 32 layers
shipped, ``--layers`` to fit memory) at batch 1: time to first token and decode tokens/s, ours
(``llm.native.NativeBackend``, full sampling rules) vs ``transformers.generate`` (greedy) on the same
modules through ``bench/hf_step1.py`` (the reference's way: DynamicCache, bias from the key length,
logits at every position), interleaved in the same process.

Part 2 (``--part mixed``): 8 requests arriving together (submitted before the worker starts), half
asking for ``--short`` new ids and half for ``--long``, clone-shaped prompts of ~``--prompt`` ids.
Three schedules of the same backend: no batching (``max_rows 1``), static batching (the old
scheduler's policy: a batch runs until its last row is done and hands all its answers back then;
``join_running=False``, answers counted at batch end; finished rows stop computing, which flatters
it a little) and continuous batching (rows join and leave between steps). Reports p50/p95 latency of the short requests, their
solo latency, and total answer ids/s. Answers are forced to their exact lengths (EOS banned).

Part 3 (``--part quant``): ``--llm-quantization`` (``llm/quantize.py``). On the shipped dimensions
(random weights, ``--layers`` of 32): the weights' bytes, the process's resident memory added by the
unquantized and by the quantized model, the peak while the quantized one is built and quantized (the
load path: full precision first), and batch-1 decode tokens/s of both through ``NativeBackend``,
interleaved in the same process (``--quant`` int8 on CPU or CUDA; int4 needs CUDA and bfloat16). Then,
on the tiny Step1 of the tests (real id layout, ``testkit/tiny_models.py``), the greedy agreement with
the unquantized model: top-1 agreement with the same history (teacher forced) and the free-running
greedy answers' common prefix, plus the logits' error.

Part 4 (``--part attention``, issue 25): the attention rebuilt without per-head key copies, without a
materialised [B,H,S,K] bias and without host syncs, against the old path (``old_forward`` below: the code
before issue 25, kept here as the baseline) on the same weights, in the same process, interleaved. Shipped
head dimensions (48 heads, 4 groups, head size 64, hidden 3072, intermediate 8192, vocab 74752), fewer
layers (``--layers 2`` in the recorded run). (a) One decode step at 8 rows x 2,048 positions (the new path is ``llm.decode_step``'s
static-shape step, as the native backend runs it); (b) one 512-token prefill chunk at K = 8,192 (positions
7,680..8,191): time and transient memory, the peak resident size above the resident size before the call
(the kernel's high-water mark, reset through /proc/self/clear_refs; the script re-runs itself with
``MALLOC_MMAP_THRESHOLD_`` fixed so that freed tensors leave the resident set). Also the max logit
difference between the two paths.

Usage:
    PYTHONPATH=$PWD .venv/bin/python bench/llm_bench.py --part single --layers 8 --prompt 64 --new 8
    PYTHONPATH=$PWD .venv/bin/python bench/llm_bench.py --part mixed --hidden 768 --layers 6
    PYTHONPATH=$PWD .venv/bin/python bench/llm_bench.py --part quant --quant int8 --layers 4 --prompt 32 --new 8
    PYTHONPATH=$PWD .venv/bin/python bench/llm_bench.py --part attention --layers 2 --threads 2
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from common import clone_prompt, environment_header
from core.devices import configure_tf32, resolve_device, resolve_dtype
from llm.backend import GenerationRequest
from llm.checkpoint import random_state_dict
from llm.native import NativeBackend
from llm.quantize import check_quantization, quantize_step1, weight_bytes
from llm.sampling import SamplingConfig
from llm.step1 import Step1Config, Step1ForCausalLM

SHIPPED = dict(hidden=3072, intermediate=8192, heads=48, groups=4, layers=32, vocab=74752)
EOS = (3,)


def build_model(args, device, dtype) -> Step1ForCausalLM:
    config = Step1Config(hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_attention_heads=args.heads, num_attention_groups=args.groups,
                         num_hidden_layers=args.layers, vocab_size=args.vocab)
    with torch.device("meta"):
        model = Step1ForCausalLM(config)
    model.load_state_dict(random_state_dict(config, seed=0, dtype=dtype), strict=True, assign=True)
    return model.to(device).eval().requires_grad_(False)



class Stamps:
    """A transformers streamer that only notes when each ``put`` (prompt, then every new id) happens."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        if torch.is_tensor(value) and value.device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def part_single(args, device, dtype) -> list[str]:
    from hf_step1 import HFStep1

    model = build_model(args, device, dtype)
    hf = HFStep1(model).eval()
    prompt = clone_prompt(np.random.default_rng(0), args.prompt)
    config = SamplingConfig(max_length=args.prompt + args.new + 8, min_new_tokens=10**6)
    backend = NativeBackend(model, None, config, EOS, max_rows=1, step_token_budget=max(args.prompt + 1, 64))
    ids = torch.tensor([prompt], device=device)

    def ours():
        out = backend.submit(GenerationRequest(prompt, seed=1, max_new_tokens=args.new)).result()
        return out.prefill_ms, (len(out.answer) - 1) / (out.decode_ms / 1000.0)

    def theirs():
        stamps = Stamps()
        with torch.inference_mode():
            start = time.perf_counter()
            hf.generate(ids, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, pad_token_id=0,
                        streamer=stamps)
        new = stamps.times[1:]             # the first put is the prompt itself
        return (new[0] - start) * 1000.0, (len(new) - 1) / (new[-1] - new[0])

    results = {"ours": [], "transformers.generate": []}
    for i in range(args.repeats + 1):        # round 0 is warm-up
        for name, fn in (("ours", ours), ("transformers.generate", theirs)):
            r = fn()
            if i:
                results[name].append(r)
            print(name, f"ttft {r[0]:.0f} ms, decode {r[1]:.2f} tok/s", flush=True)
    backend.close()
    rows = ["| batch 1 | TTFT ms (median) | decode tok/s (median) |", "|---|---|---|"]
    med = {n: (float(np.median([r[0] for r in v])), float(np.median([r[1] for r in v]))) for n, v in results.items()}
    for name, (ttft, tps) in med.items():
        rows.append(f"| {name} | {ttft:.0f} | {tps:.2f} |")
    rows.append(f"| ours / generate | {med['transformers.generate'][0] / med['ours'][0]:.2f}x faster | "
                f"{med['ours'][1] / med['transformers.generate'][1]:.2f}x |")
    return rows


def run_mixed(model, config, reqs, at_batch_end: bool = False, **backend_kw) -> tuple[list[float], float]:
    """Latency (s) of each request and total wall (s), all submitted before the worker starts.

    ``at_batch_end``: every request's answer counts as delivered when its batch is done, as the old
    static scheduler returned a batch's rows together (valid here: all requests fit one batch).
    """
    backend = NativeBackend(model, None, config, EOS, start=False, **backend_kw)
    try:
        start = time.perf_counter()
        streams = [backend.submit(r) for r in reqs]
        backend.start()
        done = [0.0] * len(reqs)
        # Results are read in finishing order: poll so that a later-finishing stream never hides an earlier one.
        pending = set(range(len(reqs)))
        while pending:
            for i in list(pending):
                if streams[i].done:
                    done[i] = time.perf_counter() - start
                    streams[i].result()
                    pending.discard(i)
            time.sleep(0.002)
        wall = time.perf_counter() - start
        return ([max(done)] * len(done) if at_batch_end else done), wall
    finally:
        backend.close()


def part_mixed(args, device, dtype) -> list[str]:
    model = build_model(args, device, dtype)
    rng = np.random.default_rng(1)
    config = SamplingConfig(max_length=args.prompt + args.long + 64, min_new_tokens=10**6)
    lengths = [args.short if i % 2 == 0 else args.long for i in range(8)]
    reqs = [GenerationRequest(clone_prompt(rng, args.prompt + int(rng.integers(-20, 20))), seed=i, max_new_tokens=n)
            for i, n in enumerate(lengths)]
    short = [i for i, n in enumerate(lengths) if n == args.short]
    solo, _ = run_mixed(model, config, [reqs[short[0]]], max_rows=1, step_token_budget=args.budget)
    solo, _ = run_mixed(model, config, [reqs[short[0]]], max_rows=1, step_token_budget=args.budget)  # warm
    print(f"solo short request: {solo[0]:.2f} s", flush=True)
    rows = [f"solo latency of one short request: {solo[0]:.2f} s",
            "", "| schedule | short p50 (s) | short p95 (s) | short p95 / solo | all done (s) | answer ids/s |",
            "|---|---|---|---|---|---|"]
    total_ids = sum(lengths)
    for name, kw in (("no batching", dict(max_rows=1)),
                     ("static (old)", dict(max_rows=8, join_running=False, at_batch_end=True)),
                     ("continuous (new)", dict(max_rows=8))):
        lat, wall = run_mixed(model, config, reqs, step_token_budget=args.budget, **kw)
        s = [lat[i] for i in short]
        p50, p95 = float(np.percentile(s, 50)), float(np.percentile(s, 95))
        rows.append(f"| {name} | {p50:.2f} | {p95:.2f} | {p95 / solo[0]:.2f}x | {wall:.1f} | {total_ids / wall:.1f} |")
        print(rows[-1], flush=True)
    return rows


def _rss() -> int:
    """Resident bytes of this process (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples the resident size every 5 ms on a thread while the ``with`` block runs."""

    def __enter__(self):
        self.peak, self._stop = _rss(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _memory(device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else _rss()


def _decode_rate(backend, prompt, new: int) -> float:
    out = backend.submit(GenerationRequest(prompt, seed=1, max_new_tokens=new)).result()
    return (len(out.answer) - 1) / (out.decode_ms / 1000.0)


def _greedy_agreement(mode: str, device, dtype) -> list[str]:
    """Tiny Step1 (real id layout): teacher-forced top-1 agreement, free-running greedy prefix, logit error."""
    from testkit.tiny_models import build_tiny_llm

    from llm.checkpoint import load_step1

    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_llm(Path(tmp) / "llm")
        full = load_step1(folder, device, dtype)
        quant = quantize_step1(load_step1(folder, device, dtype), mode)
    g = torch.Generator().manual_seed(0)
    agree = total = 0
    worst_abs = worst_rel = 0.0
    for _ in range(16):
        seq = torch.randint(0, full.config.vocab_size, (64,), generator=g).tolist()
        logits = []
        for model in (full, quant):
            cache = model.new_cache(1, len(seq))
            with torch.inference_mode():
                logits.append(model(torch.tensor([seq], device=device), torch.arange(len(seq), device=device)[None],
                                    cache, torch.tensor([0], device=device))[0].float())
        a, b = logits
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += len(seq)
        worst_abs = max(worst_abs, float((a - b).abs().max()))
        worst_rel = max(worst_rel, float(((a - b).norm(dim=-1) / a.norm(dim=-1)).max()))
    # A window longer than any sequence turns the repetition ban off (greedy as in the reference's generate).
    greedy = SamplingConfig(top_k=1, slot_mask=False, repetition_window=129, max_length=128)
    answers = []
    for model in (full, quant):
        backend = NativeBackend(model, None, greedy, EOS, max_rows=8, step_token_budget=512, start=False)
        streams = [backend.submit(GenerationRequest(tuple(torch.randint(0, full.config.vocab_size, (24,),
                   generator=torch.Generator().manual_seed(100 + i)).tolist()), seed=0, max_new_tokens=32))
                   for i in range(16)]
        backend.start()
        answers.append([s.result(300).answer for s in streams])
        backend.close()
    prefix = [next((i for i, (x, y) in enumerate(zip(p, q)) if x != y), min(len(p), len(q)))
              for p, q in zip(*answers)]
    same = sum(p == q for p, q in zip(*answers))
    return [f"tiny Step1 (hidden 48, 2 layers, vocab 70656), {mode} vs unquantized, {str(dtype).replace('torch.', '')}:",
            "", "| measure | value |", "|---|---|",
            f"| greedy top-1 agreement, same history (16 x 64 positions) | {agree / total:.3f} |",
            f"| free-running greedy answers identical (16 x 32 ids) | {same}/16 |",
            f"| mean common prefix of those answers | {np.mean(prefix):.1f} of 32 ids |",
            f"| max abs logit error (max abs logit of the model ~0.7) | {worst_abs:.4f} |",
            f"| max relative L2 logit error per position | {worst_rel:.4f} |"]


def part_quant(args, device, dtype) -> list[str]:
    mode = args.quant
    check_quantization(mode, device, dtype)
    prompt = clone_prompt(np.random.default_rng(0), args.prompt)
    config = SamplingConfig(max_length=args.prompt + args.new + 8, min_new_tokens=10**6)
    before = _memory(device)
    full = build_model(args, device, dtype)
    after_full = _memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        with PeakRSS() as peak:
            quant = quantize_step1(build_model(args, device, dtype), mode)
        peak_bytes = torch.cuda.max_memory_allocated(device)
    else:
        with PeakRSS() as peak:
            quant = quantize_step1(build_model(args, device, dtype), mode)
        peak_bytes = peak.peak
    after_quant = _memory(device)
    kind = "GPU allocated" if device.type == "cuda" else "RSS"
    rows = [f"| {str(dtype).replace('torch.', '')} weights | bytes (counted) | {kind} added | decode tok/s (median) |",
            "|---|---|---|---|"]
    budget = max(args.prompt + 1, 64)
    backends = {"unquantized": NativeBackend(full, None, config, EOS, max_rows=1, step_token_budget=budget),
                mode: NativeBackend(quant, None, config, EOS, max_rows=1, step_token_budget=budget)}
    rates: dict[str, list[float]] = {name: [] for name in backends}
    for i in range(args.repeats + 1):         # round 0 is warm-up
        for name, backend in backends.items():
            r = _decode_rate(backend, prompt, args.new)
            print(f"round {i} {name}: {r:.2f} tok/s", flush=True)
            if i:
                rates[name].append(r)
    for backend in backends.values():
        backend.close()
    med = {n: float(np.median(v)) for n, v in rates.items()}
    added = {"unquantized": after_full - before, mode: after_quant - after_full}
    for name, model in (("unquantized", full), (mode, quant)):
        rows.append(f"| {name} | {weight_bytes(model) / 2**30:.2f} GiB | {added[name] / 2**30:.2f} GiB | {med[name]:.2f} |")
    rows.append(f"| {mode} / unquantized | {weight_bytes(quant) / weight_bytes(full):.2f}x | "
                f"{added[mode] / added['unquantized']:.2f}x | {med[mode] / med['unquantized']:.2f}x |")
    rows += ["", f"peak {kind} while building + quantizing the {mode} model: "
             f"{(peak_bytes - after_full) / 2**30:.2f} GiB above the unquantized model alone "
             f"(it is built in full precision first)",
             "timed rounds: " + "; ".join(f"{n} " + " / ".join(f"{r:.2f}" for r in v) for n, v in rates.items()),
             ""]
    del full, quant, backends
    return rows + _greedy_agreement(mode, device, dtype)


def old_slopes(heads: int) -> list[float]:
    """The slopes as computed before issue 25 (float64 powers)."""
    n = 2 ** int(math.floor(math.log2(heads)))
    slopes = [(2.0 ** (-8.0 / n)) ** k for k in range(1, n + 1)]
    return slopes + [(2.0 ** (-4.0 / n)) ** m for m in range(1, 2 * (heads - n), 2)]


def old_forward(model: Step1ForCausalLM, input_ids, positions, cache, slots, logits_at) -> torch.Tensor:
    """The Step1 forward before issue 25, on the current modules and cache: boolean-mask cache writes,
    ``int(positions.max())``, a [B,H,S,K] float32 bias cast to the dtype, keys/values ``repeat_interleave``d
    to every head. The baseline of part attention (and a parity check of the new path)."""
    width = int(positions.max()) + 1
    real = positions >= 0
    slot_of = slots[:, None].expand_as(positions)
    slot, pos = slot_of[real], positions[real]
    x = model.model.embed_tokens(input_ids)
    slopes = torch.tensor(old_slopes(model.config.num_attention_heads), dtype=torch.float32, device=x.device)
    query = positions.clamp(min=0)
    distance = query[:, :, None] - torch.arange(width, device=x.device)[None, None, :]
    bias = -slopes[None, :, None, None] * distance.clamp(min=0).float().sqrt()[:, None]
    bias = bias.masked_fill((distance < 0)[:, None], float("-inf")).to(x.dtype)
    for layer, keys, values in zip(model.model.layers, cache.keys, cache.values):
        attn, h = layer.self_attn, layer.input_layernorm(x)
        b, s, _ = h.shape
        q = attn.q_proj(h).view(b, s, attn.heads, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(b, s, attn.groups, attn.head_dim)
        v = attn.v_proj(h).view(b, s, attn.groups, attn.head_dim)
        keys[slot, pos] = k[real]
        values[slot, pos] = v[real]
        rep = attn.heads // attn.groups
        k_all = keys[slots, :width].transpose(1, 2).repeat_interleave(rep, dim=1)
        v_all = values[slots, :width].transpose(1, 2).repeat_interleave(rep, dim=1)
        out = torch.nn.functional.scaled_dot_product_attention(q, k_all, v_all, attn_mask=bias)
        x = x + attn.o_proj(out.transpose(1, 2).reshape(b, s, attn.heads * attn.head_dim))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    x = x[torch.arange(x.shape[0], device=x.device), logits_at]
    return model.lm_head(model.model.norm(x))


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def transient_bytes(fn) -> int:
    """Peak resident bytes above the resident size just before ``fn()`` (kernel high-water mark)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                         # resets VmHWM to the current resident size
    before = _status("VmRSS")
    fn()
    return _status("VmHWM") - before


def part_attention(args, device, dtype) -> list[str]:
    if device.type != "cpu":
        raise SystemExit("part attention measures the CPU path; bench/gpu_check.py --all measures the GPU")
    model = build_model(args, device, dtype)
    rows, positions, chunk, keys = 8, 2048, 512, 8192
    g = torch.Generator().manual_seed(0)
    rows_out = [f"load average at start: {os.getloadavg()[0]:.2f} (a shared machine: other jobs run beside this)",
                "", "| measure | old path | new path | old / new |", "|---|---|---|---|"]

    cases = args.cases.split(",")
    # (a) decode: 8 rows, each at position 2047 with 2,047 keys already cached (random values).
    diff = diff_prefill = float("nan")
    if "decode" in cases:
        rows_out += _attention_decode(args, model, rows, positions, g)
        diff = rows_out.pop()
    if "prefill" in cases:
        more, diff_prefill = _attention_prefill(args, model, chunk, keys, g)
        rows_out += more
    rows_out += ["", f"max |logit difference| new vs old: decode {diff:.2e}, prefill {diff_prefill:.2e} "
                 "(float32; the slopes now round like the reference's float32 ones)",
                 f"load average at end: {os.getloadavg()[0]:.2f}"]
    return rows_out


def _attention_decode(args, model, rows, positions, g) -> list:
    from common import interleaved, summary

    from llm.decode_step import DecodeStep

    cache = model.new_cache(rows, positions)
    for t in cache.keys + cache.values:
        t[:, :positions - 1].normal_(generator=g)
    ids = torch.randint(0, args.vocab, (rows,), generator=g)
    slots = torch.arange(rows)
    step = DecodeStep(model, cache)
    pos = torch.full((rows, 1), positions - 1)
    with torch.inference_mode():
        new = step(ids.tolist(), [positions - 1] * rows, slots.tolist()).clone()
        old = old_forward(model, ids[:, None], pos, cache, slots, torch.zeros(rows, dtype=torch.long))
        diff = float((new - old).abs().max())
        times = interleaved({"old": lambda: old_forward(model, ids[:, None], pos, cache, slots,
                                                        torch.zeros(rows, dtype=torch.long)),
                             "new": lambda: step(ids.tolist(), [positions - 1] * rows, slots.tolist())},
                            n=args.repeats * 3, warmup=1)
    med = {k: summary(v)["median"] for k, v in times.items()}
    rows_out = []
    rows_out.append(f"| decode step, {rows} rows x {positions} positions, ms (median of {len(times['old'])}) | "
                    f"{med['old']:.1f} | {med['new']:.1f} | {med['old'] / med['new']:.2f}x |")
    print(rows_out[-1], f"max |logit diff| {diff:.2e}", flush=True)
    return rows_out + [diff]


def _attention_prefill(args, model, chunk, keys, g) -> tuple[list, float]:
    from common import interleaved, summary

    # (b) prefill: one 512-token chunk at positions 7680..8191 (K = 8192).
    rows_out = []
    cache = model.new_cache(1, keys)
    for t in cache.keys + cache.values:
        t[:, :keys - chunk].normal_(generator=g)
    ids = torch.randint(0, args.vocab, (1, chunk), generator=g)
    pos = torch.arange(keys - chunk, keys)[None]
    slot, last = torch.tensor([0]), torch.tensor([chunk - 1])
    calls = {"old": lambda: old_forward(model, ids, pos, cache, slot, last),
             "new": lambda: model(ids, pos, cache, slot, logits_at=last, width=keys)}
    with torch.inference_mode():
        diff_prefill = float((calls["new"]() - calls["old"]()).abs().max())
        memory = {name: [] for name in calls}
        for _ in range(2):
            for name, fn in calls.items():
                memory[name].append(transient_bytes(fn))
        ptimes = interleaved(calls, n=args.repeats, warmup=0)
    mem = {k: min(v) / 2**20 for k, v in memory.items()}
    pmed = {k: summary(v)["median"] for k, v in ptimes.items()}
    rows_out.append(f"| prefill chunk {chunk} tokens at K = {keys}: transient memory, MiB (min of 2) | "
                    f"{mem['old']:.0f} | {mem['new']:.0f} | {mem['old'] / mem['new']:.1f}x less |")
    rows_out.append(f"| prefill chunk {chunk} tokens at K = {keys}: ms (median of {args.repeats}) | "
                    f"{pmed['old']:.0f} | {pmed['new']:.0f} | {pmed['old'] / pmed['new']:.2f}x |")
    print("\n".join(rows_out), flush=True)
    return rows_out, diff_prefill


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("single", "mixed", "quant", "attention"), required=True)
    parser.add_argument("--quant", choices=("int8", "int4"), default="int8", help="part quant: the mode measured")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    for name, value in SHIPPED.items():
        parser.add_argument(f"--{name}", type=int, default=value)
    parser.add_argument("--prompt", type=int, default=300, help="prompt ids")
    parser.add_argument("--new", type=int, default=32, help="part single: new ids per run")
    parser.add_argument("--repeats", type=int, default=3, help="part single: timed rounds")
    parser.add_argument("--short", type=int, default=20)
    parser.add_argument("--long", type=int, default=200)
    parser.add_argument("--budget", type=int, default=512, help="step token budget")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--cases", default="decode,prefill", help="part attention: which cases")
    args = parser.parse_args()
    if args.part == "attention" and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # A fixed mmap threshold: every large tensor gets its own mapping and leaves the resident set when
        # freed, so the resident high-water mark measures transient tensors (glibc reads this at start).
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576"})
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    configure_tf32(True)
    params = (args.vocab * args.hidden * 2 + args.layers * (
        2 * args.hidden * args.hidden + 2 * args.hidden * args.hidden * args.groups // args.heads
        + 3 * args.hidden * args.intermediate)) / 1e9
    header = environment_header(device, dtype, [
        f"Step1 random weights: hidden {args.hidden}, intermediate {args.intermediate}, {args.heads} heads / "
        f"{args.groups} groups, {args.layers} layers, vocab {args.vocab} ({params:.2f} B params)",
        f"prompt ~{args.prompt} ids"])
    print(header, flush=True)
    parts = {"single": part_single, "mixed": part_mixed, "quant": part_quant, "attention": part_attention}
    rows = parts[args.part](args, device, dtype)
    if device.type == "cuda":
        rows.append(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    print("\n" + header + "\n\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
