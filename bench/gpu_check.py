"""GPU checks: the engine smoke check on tiny models, and ``--all``: the speed table of issue 25.

Default (no ``--all``): builds the tiny model root the tests use, loads ``StepAudioEngine`` on CUDA
(bfloat16 by default), and checks what only a GPU can show: TF32 flags after loading, the ONNX providers
the sessions use, a clone and an edit end to end, seed reproducibility, a repeated prompt served from the
cache. Needs the studio's full environment (funasr, soundfile, ...). Prints one line per check.

``--all`` (issue 25) writes ONE markdown table, every model built in place with random weights:

- ``llm``: the native Step1 at the shipped size (hidden 3072, 48 heads / 4 groups, 32 layers, vocabulary
  74752; bfloat16): decode tokens/s at 1, 8 and 32 rows through ``NativeBackend`` (CUDA-graph decode steps,
  full sampling rules), prefill ms for 500 and 2,000 tokens (one call, FlexAttention on CUDA).
- ``ttfa``: time to first audio at 1, 4 and 8 concurrent streams: that LLM's ids streamed into the
  shipped-size decoder's streaming sessions (``decoder.streaming``: ``StreamingDecoder.prompt_state`` /
  ``open`` / ``push`` / ``drain`` only, its public API; engineer #27 optimises it), from submitting the
  request to the first waveform chunk; the voice's prompt state is cached first, as for a stored voice.
- ``stream``: streamed / non-streamed total decode time for 15 s of speech (issue 27's GPU ratio).
- ``vq02``: the parallel vq02 encoder's speed-up over the streaming loop (real-size random Paraformer;
  needs funasr, see below).
- ``bestof``: issue 24's best-of-3: three takes of one request started together through
  ``quality.gates.generate_gated`` (their LLM rows share the native backend's decode steps; each take is
  the shipped-size Step1's ids then the shipped-size decoder's ``token2wav``) against the same three
  takes one after another; for the LLM alone and for the whole take. Target: at least 2x.
- ``tf32``: the TF32 numerics margin: Step1 (shipped dimensions, 4 layers, float32) logits with TF32 on
  vs off; the smallest top-1/top-2 logit gap over the largest logit change (a margin above 1: no greedy
  choice can flip), and the flips counted.
- peak GPU memory of the run.

The lent GPU machine has its own Python 3.12 with torch, numpy, safetensors, transformers (and PyYAML,
its dependency) and a CPU onnxruntime; it lacks funasr, soundfile, soxr, librosa, kaldi_native_fbank,
jiwer, pyloudnorm and gradio, and nothing can be installed there. The decoder package imports
soundfile/soxr (``core.audio_io``), librosa and kaldi_native_fbank (``decoder.frontend``) at module level
but uses them only to read audio and compute prompt features, which this script builds directly; the
quality package imports jiwer and pyloudnorm for checks the ``bestof`` part does not run; so for those six
a module that raises on first use stands in when the real one is missing (``_absent``), and the table's
header says which did.
funasr cannot be stood in for: the ``vq02`` part needs it and FAILS (loudly, in the table and the exit
code) without it. Its import closure (numba, llvmlite, scipy, scikit-learn, pandas, librosa, modelscope,
hydra, ...) is far beyond the 64 MiB that travels with a run, so no wheels are carried: that row is
expected to fail on the lent machine, and every other part runs there.

A part that cannot run fails: its row says FAILED with the reason, the rest still run, the exit code is 1.
``--dry-run`` runs every part on the CPU with tiny dimensions and few steps (the test suite does, so the
script cannot rot); its numbers mean nothing.

    PYTHONPATH=$PWD python3 bench/gpu_check.py --all [--parts llm,ttfa,stream,vq02,bestof,tf32] [--dry-run]
    PYTHONPATH=$PWD python3 bench/gpu_check.py [--dtype float32] [--no-tf32]   # the engine smoke check

(from the repository root: ``PYTHONPATH`` makes the project's packages importable where no venv has it
installed, as on the lent GPU machine; ``bench/`` itself is on the path when the file runs as a script.)
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import threading
import time
import traceback
import types
from pathlib import Path

import numpy as np

from common import clone_prompt, mixed_tokens   # bench/common.py (bench/ is sys.path[0] for a script)

ROOT = Path(__file__).resolve().parent.parent

STAND_INS = ("soundfile", "soxr", "librosa", "kaldi_native_fbank", "jiwer", "pyloudnorm")
PARTS = ("llm", "ttfa", "stream", "vq02", "bestof", "tf32")


def _absent(name: str) -> types.ModuleType:
    """A module for ``name`` that raises on any use: the import succeeds, a call fails loudly."""
    module = types.ModuleType(name)

    def missing(attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        raise RuntimeError(f"{name}.{attr} was used, but {name} is not installed here; gpu_check builds its "
                           "inputs without it, so this is a bug in the check")

    module.__getattr__ = missing
    return module


def stand_in_missing() -> list[str]:
    """Install ``_absent`` modules for the missing ``STAND_INS``; returns their names."""
    missing = []
    for name in STAND_INS:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
            sys.modules[name] = _absent(name)
    return missing


class Failed(Exception):
    """A part could not run (the table says why)."""


# ---------------------------------------------------------------------------------------------- sizes


def sizes(dry: bool) -> dict:
    if dry:
        return dict(llm=dict(hidden_size=64, intermediate_size=128, num_attention_heads=8, num_attention_groups=2,
                             num_hidden_layers=2, vocab_size=70656),
                    tf32_layers=1, rows=(1, 2), new=3, prompt=20, prefill=(16, 32), streams=(1, 2),
                    ttfa_new=36, stream_seconds=0.6, steps=1, repeats=1, vq02_seconds=0.5, bestof_new=10)
    return dict(llm=dict(hidden_size=3072, intermediate_size=8192, num_attention_heads=48, num_attention_groups=4,
                         num_hidden_layers=32, vocab_size=74752),
                tf32_layers=4, rows=(1, 8, 32), new=128, prompt=400, prefill=(500, 2000), streams=(1, 4, 8),
                ttfa_new=60, stream_seconds=15.0, steps=10, repeats=3, vq02_seconds=15.0, bestof_new=125)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------- models


def build_llm(config_kw: dict, device, dtype, layers: int | None = None):
    """Step1 with seeded random weights made on ``device`` (N(0, 0.02) matrices, unit norms)."""
    import torch

    from llm.step1 import Step1Config, Step1ForCausalLM

    config = Step1Config(**{**config_kw, **({"num_hidden_layers": layers} if layers else {})})
    with torch.device("meta"):
        model = Step1ForCausalLM(config)
    model = model.to_empty(device=device).to(dtype)       # drawn in the final dtype: no float32 copy
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=generator)
    return model.eval().requires_grad_(False)




def build_decoder(device, dtype, dry: bool):
    """``AudioDecoder`` (shipped yaml, or the tiny test one for a dry run) with seeded random weights, built
    in place; no prompt frontend (the prompt's mel and speaker embedding are given as arrays)."""
    import torch

    from decoder.config import parse_decoder_config
    from decoder.flow import FlowDecoder
    from decoder.model import AudioDecoder
    from decoder.vocoder import HiFTGenerator

    yaml_name = "cosyvoice.yaml" if dry else "cosyvoice_shipped.yaml"
    cfg = parse_decoder_config((ROOT / "tests" / "fixtures" / "decoder" / yaml_name).read_text())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        flow, hift = FlowDecoder(cfg.flow), HiFTGenerator(cfg.hift)
        with torch.no_grad():      # as bench/decoder_bench.py: keeps the DiT's activations finite
            for p in flow.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, 0.02)
    hift.fold_weight_norm()
    return AudioDecoder(cfg, flow.to(device=device, dtype=dtype).eval(), hift.to(device=device).eval(), None,
                        device=device, dtype=dtype)


def prompt_features(decoder, groups: int):
    from decoder.frontend import PromptFeatures

    rng = np.random.default_rng(1)
    frames = 2 * 3 * groups               # 3 token frames per group, 2 mel frames per token frame
    mel = (rng.standard_normal((frames, decoder.config.mel.num_mels)) * 0.5 - 5.0).astype(np.float32)
    return PromptFeatures(mel=mel, embedding=rng.standard_normal(192).astype(np.float32))


# ---------------------------------------------------------------------------------------------- parts


def part_llm(ctx) -> list[tuple[str, str]]:
    import torch

    from llm.backend import GenerationRequest
    from llm.native import NativeBackend
    from llm.sampling import SamplingConfig

    s, device = ctx.sizes, ctx.device
    model = ctx.llm()
    rows_out = []
    for rows in s["rows"]:
        config = SamplingConfig(max_length=s["prompt"] + s["new"] + 64, min_new_tokens=10**6)
        backend = NativeBackend(model, None, config, (3,), max_rows=rows, step_token_budget=max(512, rows + 1))
        try:
            rates, summed = [], []
            for rep in range(1 + s["repeats"]):                 # round 0: warm-up (graph capture)
                streams = [backend.submit(GenerationRequest(clone_prompt(np.random.default_rng(i), s["prompt"]),
                                                            seed=i, max_new_tokens=s["new"])) for i in range(rows)]
                outs = [st.result(600) for st in streams]
                per_row = [(len(o.answer) - 1) / (o.decode_ms / 1000.0) for o in outs]
                if rep:
                    rates.append(float(np.median(per_row)))
                    summed.append(float(sum(per_row)))
            graphs = backend._step.captured
        finally:
            backend.close()
        if device.type == "cuda" and not graphs:
            ctx.problems.append(f"no CUDA graph was captured for {rows}-row decode steps (see the warning)")
        rows_out.append((f"native decode, {rows} row{'s' if rows > 1 else ''}: tokens/s per row / summed",
                         f"{np.median(rates):.0f} / {np.median(summed):.0f} ({graphs} CUDA graphs)"))
    for n in s["prefill"]:
        cache = model.new_cache(1, n + 8)
        ids = torch.randint(0, 65536, (1, n), device=device)
        pos = torch.arange(n, device=device)[None]
        slot, last = torch.zeros(1, dtype=torch.long, device=device), torch.tensor([n - 1], device=device)
        times = []
        with torch.inference_mode():
            start = time.perf_counter()
            model(ids, pos, cache, slot, logits_at=last, width=n)       # compiles FlexAttention on CUDA
            sync(device)
            first = (time.perf_counter() - start) * 1000.0
            for _ in range(max(2, s["repeats"])):
                start = time.perf_counter()
                model(ids, pos, cache, slot, logits_at=last, width=n)
                sync(device)
                times.append((time.perf_counter() - start) * 1000.0)
        impl = model.impl_for(device, n)
        if device.type == "cuda" and impl != "flex":
            impl = "sdpa: FlexAttention FAILED, see the warning above"
            ctx.problems.append("FlexAttention did not run on CUDA (the model fell back to SDPA)")
        rows_out.append((f"prefill {n} tokens, ms (median; {impl})", f"{np.median(times):.1f} (first call "
                                                                      f"{first:.0f}, compile included)"))
    return rows_out


def part_ttfa(ctx) -> list[tuple[str, str]]:
    from core.audio_tokens import AUDIO_ID_OFFSET
    from llm.backend import GenerationRequest
    from llm.native import NativeBackend
    from llm.sampling import SamplingConfig

    s = ctx.sizes
    decoder, streamer, state = ctx.voice()
    config = SamplingConfig(max_length=s["prompt"] + s["ttfa_new"] + 64, min_new_tokens=10**6)
    backend = NativeBackend(ctx.llm(), None, config, (3,), max_rows=max(s["streams"]), step_token_budget=1024)

    def one(seed: int, out: list, i: int) -> None:
        start = time.perf_counter()
        stream = backend.submit(GenerationRequest(clone_prompt(np.random.default_rng(100 + seed), s["prompt"]),
                                                  seed=seed, max_new_tokens=s["ttfa_new"]))
        session = streamer.open(state, seed)
        first = None
        for token in stream:
            session.push([token - AUDIO_ID_OFFSET])
            for chunk in session.drain():
                if first is None and chunk.size:
                    first = (time.perf_counter() - start) * 1000.0
            if first is not None:
                stream.cancel()
                break
        if first is None:
            for chunk in session.drain(final=True):
                first = first if first is not None else (time.perf_counter() - start) * 1000.0
        session.close()
        out[i] = first

    rows_out = []
    try:
        for i, n in enumerate((1, *s["streams"])):       # pass 0 (one stream) warms up: graphs, kernels
            results: list = [None] * n
            threads = [threading.Thread(target=one, args=(1000 * i + j, results, j)) for j in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(600)
            if any(r is None for r in results):
                raise Failed(f"{results.count(None)} of {n} streams produced no audio")
            if i:
                rows_out.append((f"time to first audio, {n} stream{'s' if n > 1 else ''}, ms (median / max)",
                                 f"{np.median(results):.0f} / {max(results):.0f}"))
    finally:
        backend.close()
    return rows_out


def part_stream(ctx) -> list[tuple[str, str]]:
    s = ctx.sizes
    decoder, streamer, state = ctx.voice()
    tokens = mixed_tokens(int(round(s["stream_seconds"] / 0.12)), np.random.default_rng(7))
    features = ctx.features
    whole, streamed = [], []
    for rep in range(1 + s["repeats"]):
        start = time.perf_counter()
        wav = decoder.token2wav(tokens, ctx.prompt_tokens, features, seed=rep, n_steps=s["steps"]).samples
        sync(ctx.device)
        w = (time.perf_counter() - start) * 1000.0
        start = time.perf_counter()
        samples = sum(chunk.size for chunk in streamer.stream(tokens, state, seed=rep))
        sync(ctx.device)
        st = (time.perf_counter() - start) * 1000.0
        if samples != wav.size:
            raise Failed(f"streamed {samples} samples, non-streamed {wav.size}")
        if rep:
            whole.append(w)
            streamed.append(st)
    ratio = float(np.median(streamed)) / float(np.median(whole))
    return [(f"decode {s['stream_seconds']:g} s of speech: streamed / non-streamed total",
             f"{ratio:.2f} ({np.median(streamed):.0f} / {np.median(whole):.0f} ms)")]


def part_vq02(ctx) -> list[tuple[str, str]]:
    try:
        importlib.import_module("funasr")
    except ImportError:
        raise Failed("funasr is not installed here (the vq02 Paraformer is built with it; its import closure "
                     "is too large to carry)") from None
    from core.settings import FUNASR_SUBDIR
    from tokenizer.paraformer_stream import ParaformerStream

    with tempfile.TemporaryDirectory() as tmp:
        if ctx.dry:
            folder = ROOT / "tests" / "fixtures" / "tokenizer" / "Step-Audio-Tokenizer" / FUNASR_SUBDIR
        else:
            from tokenizer_bench import build_real_size   # bench/ is sys.path[0] when run as a script

            folder = build_real_size(Path(tmp)) / FUNASR_SUBDIR
        stream = ParaformerStream.load(folder, ctx.device, encoder_mode="parallel")
        seconds = ctx.sizes["vq02_seconds"]
        wav = (np.random.default_rng(0).standard_normal(int(16000 * seconds)) * 0.1).astype(np.float32)
        times = {"streaming": [], "parallel": []}
        for rep in range(1 + ctx.sizes["repeats"]):
            for mode in times:
                start = time.perf_counter()
                stream.encode(wav, mode=mode)
                sync(ctx.device)
                if rep:
                    times[mode].append((time.perf_counter() - start) * 1000.0)
    med = {k: float(np.median(v)) for k, v in times.items()}
    return [(f"vq02 encoder, {seconds:g} s clip: parallel speed-up over streaming",
             f"{med['streaming'] / med['parallel']:.2f}x ({med['parallel']:.0f} vs {med['streaming']:.0f} ms)")]


def part_bestof(ctx) -> list[tuple[str, str]]:
    from core.audio_io import Audio
    from llm.backend import GenerationRequest
    from llm.native import NativeBackend
    from llm.sampling import SamplingConfig
    from quality.gates import Gates, generate_gated
    from quality.report import QualityScorer

    s = ctx.sizes
    decoder, _, _ = ctx.voice()
    new = s["bestof_new"]                                # 125 ids: 3 s of speech
    config = SamplingConfig(max_length=s["prompt"] + new + 64, min_new_tokens=10**6)
    backend = NativeBackend(ctx.llm(), None, config, (3,), max_rows=8, step_token_budget=1024)
    prompt = clone_prompt(np.random.default_rng(5), s["prompt"])   # one request: the candidates share the prompt

    def llm(seed: int):
        return backend.submit(GenerationRequest(prompt, seed=seed, max_new_tokens=new)).result(600)

    def whole(seed: int):
        llm(seed)
        # Random weights emit random ids; the decoder gets valid ones of the same count.
        audio = decoder.token2wav(mixed_tokens(new // 5, np.random.default_rng(seed)), ctx.prompt_tokens,
                                  ctx.features, seed=seed, n_steps=s["steps"])
        sync(ctx.device)
        return audio

    gates, scorer = Gates(checks=frozenset(), candidates=3), QualityScorer()
    silent = Audio(np.zeros(1, np.float32), 24000)      # no checks run: the takes' audio is not looked at
    rows_out = []
    try:
        for name, take in (("LLM only", llm), ("whole take (LLM + decoder)", whole)):
            together, apart = [], []
            for rep in range(1 + s["repeats"]):          # round 0 warms up (graphs, kernels)
                start = time.perf_counter()
                generate_gated(take, lambda _t: silent, "", gates, scorer, seed=100 * rep)
                t = (time.perf_counter() - start) * 1000.0
                start = time.perf_counter()
                for i in range(3):
                    take(100 * rep + i)
                a = (time.perf_counter() - start) * 1000.0
                if rep:
                    together.append(t)
                    apart.append(a)
            b, q = float(np.median(together)), float(np.median(apart))
            rows_out.append((f"best-of-3, {name}, {new} ids per take: speed-up over 3 sequential takes",
                             f"{q / b:.2f}x ({b:.0f} vs {q:.0f} ms)"))
    finally:
        backend.close()
    return rows_out


def part_tf32(ctx) -> list[tuple[str, str]]:
    import torch

    s, device = ctx.sizes, ctx.device
    model = build_llm(s["llm"], device, torch.float32, layers=s["tf32_layers"])
    n = 16 if ctx.dry else 256
    ids = torch.randint(0, s["llm"]["vocab_size"], (4, n), generator=torch.Generator().manual_seed(3)).to(device)
    pos = torch.arange(n, device=device)[None].expand(4, n)
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    logits = {}
    try:
        for tf32 in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
            cache = model.new_cache(4, n)
            with torch.inference_mode():
                logits[tf32] = model(ids, pos, cache, torch.arange(4, device=device), width=n).float()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    exact, tf = logits[False], logits[True]
    change = float((tf - exact).abs().max())
    top2 = exact.topk(2, dim=-1).values
    gap = float((top2[..., 0] - top2[..., 1]).min())
    flips = int((tf.argmax(-1) != exact.argmax(-1)).sum())
    margin = gap / change if change else float("inf")
    del model
    return [(f"TF32 vs fp32, Step1 logits ({s['tf32_layers']} layers, {4 * n} positions): max change / "
             "smallest top-2 gap / margin / greedy flips",
             f"{change:.2e} / {gap:.2e} / {margin:.2f} / {flips}" + (" (CPU: TF32 flags inert)" if device.type
                                                                       == "cpu" else ""))]


# ---------------------------------------------------------------------------------------------- run


class Context:
    """What the parts share: the device, the sizes, and the models built once (lazily)."""

    def __init__(self, device, dtype, dry: bool) -> None:
        self.device, self.dtype, self.dry = device, dtype, dry
        self.sizes = sizes(dry)
        self._llm = None
        self._voice = None
        self.problems: list[str] = []      # failures a part reports without losing its other rows

    def llm(self):
        if self._llm is None:
            self._llm = build_llm(self.sizes["llm"], self.device, self.dtype)
        return self._llm

    def voice(self):
        """(decoder, streaming decoder, cached prompt state) of a 38-group (4.6 s) prompt."""
        if self._voice is None:
            from decoder.streaming import StreamingDecoder

            decoder = build_decoder(self.device, self.dtype, self.dry)
            groups = 38
            self.prompt_tokens = mixed_tokens(groups, np.random.default_rng(11))
            self.features = prompt_features(decoder, groups)
            streamer = StreamingDecoder(decoder)
            state = streamer.prompt_state("gpu-check", self.prompt_tokens, self.features.mel,
                                          self.features.embedding, n_steps=self.sizes["steps"])
            self._voice = (decoder, streamer, state)
        return self._voice


def run_all(args) -> int:
    stood_in = stand_in_missing()
    import torch

    from core.devices import configure_tf32

    dry = args.dry_run
    if dry:
        device, dtype = torch.device("cpu"), torch.float32
        torch.set_num_threads(1)         # tiny models: extra threads only spin on a shared CI machine
    else:
        if not torch.cuda.is_available():
            print("FAILED: no CUDA device (use --dry-run for the CPU rehearsal)", file=sys.stderr)
            return 1
        device, dtype = torch.device("cuda"), torch.bfloat16
        configure_tf32(True)
        torch.cuda.reset_peak_memory_stats(device)
    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        print(f"FAILED: unknown parts {sorted(unknown)}; choose from {PARTS}", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run: tiny sizes)"
    header = (f"gpu_check --all | {name} | torch {torch.__version__} | python {sys.version.split()[0]} | "
              f"{str(dtype).replace('torch.', '')} | stand-ins for missing {', '.join(stood_in) or 'none'}")
    print(header, flush=True)
    ctx = Context(device, dtype, dry)
    table = ["| part | measure | value |", "|---|---|---|"]
    failed = 0
    start_all = time.perf_counter()
    funcs = {"llm": part_llm, "ttfa": part_ttfa, "stream": part_stream, "vq02": part_vq02, "bestof": part_bestof,
             "tf32": part_tf32}
    for part in parts:
        start = time.perf_counter()
        try:
            rows = funcs[part](ctx)
        except Exception as exc:  # noqa: BLE001 -- a part that cannot run is reported, never skipped
            failed += 1
            traceback.print_exc()
            rows = [("FAILED", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")]
        for measure, value in rows:
            table.append(f"| {part} | {measure} | {value} |")
            print(table[-1], flush=True)
        print(f"({part}: {time.perf_counter() - start:.1f} s)", flush=True)
    if device.type == "cuda":
        table.append(f"| all | peak GPU memory allocated | {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB |")
    else:
        with open("/proc/self/status") as f:
            hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
        table.append(f"| all | peak resident memory (CPU) | {hwm / 2**20:.2f} GiB |")
    table.append(f"| all | wall time | {time.perf_counter() - start_all:.0f} s |")
    print("\n" + header + "\n\n" + "\n".join(table))
    for problem in ctx.problems:
        print(f"FAILED: {problem}")
    if failed:
        print(f"\n{failed} part(s) FAILED (see the table and the tracebacks above)")
    return 1 if failed or ctx.problems else 0


def run_engine(args) -> int:
    import torch

    from core.settings import Settings
    from funasr_cache.store import PromptCache
    from testkit.tiny_models import build_tiny_model_root
    from tts_engine.step_audio import StepAudioEngine

    failures = []

    def check(name: str, ok: bool, detail: str = "") -> None:
        print(f"{'PASS' if ok else 'FAIL'} {name} {detail}".rstrip(), flush=True)
        if not ok:
            failures.append(name)

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 2
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    settings = Settings(model_root=build_tiny_model_root(work), cache_dir=work / "cache", device="cuda",
                        dtype=args.dtype, tf32=not args.no_tf32, llm_max_new_tokens=300)
    started = time.perf_counter()
    engine = StepAudioEngine(settings, PromptCache.from_settings(settings))
    print(f"engine loaded in {time.perf_counter() - started:.1f} s: {engine.describe()}")

    check("tf32 matmul flag follows settings", torch.backends.cuda.matmul.allow_tf32 == settings.tf32)
    check("tf32 cudnn flag follows settings", torch.backends.cudnn.allow_tf32 == settings.tf32)
    check("engine ready", engine.ready()[0], engine.ready()[1])
    print(f"ONNX providers in use: S3 tokenizer {engine.tokenizer.vq06_session.get_providers()}, "
          f"CAM++ {engine.decoder.frontend._session.get_providers()}")

    prompt = ROOT / "tests" / "fixtures" / "prompt_22k.wav"
    text = "The quick brown fox jumps over the lazy dog near the river bank."
    first = engine.clone(prompt, text, "Hello from the GPU.", seed=7)
    check("clone gives 24 kHz audio", first.audio.sample_rate == 24000 and len(first.audio.samples) > 0,
          f"{first.audio.duration:.2f} s, {first.timings.total_ms:.0f} ms")
    check("clone audio is finite", bool(np.isfinite(first.audio.samples).all()))
    again = engine.clone(prompt, text, "Hello from the GPU.", seed=7)
    check("same seed, same tokens", again.tokens == first.tokens)
    # cuDNN may pick different convolution algorithms between calls: equal up to float rounding.
    check("same seed, same audio (within 1e-5)", np.allclose(again.audio.samples, first.audio.samples, atol=1e-5),
          f"max diff {np.abs(again.audio.samples - first.audio.samples).max():.2e}")
    check("repeated prompt served from the cache", {"tokenize_vq02", "prompt_mel"} <= set(again.timings.cached),
          f"cached stages: {sorted(again.timings.cached)}")
    edited = engine.edit(first.audio, first.text, "emotion", "happy", seed=3)
    check("edit gives 24 kHz audio", edited.audio.sample_rate == 24000 and len(edited.audio.samples) > 0,
          f"{edited.audio.duration:.2f} s, {edited.timings.total_ms:.0f} ms")
    print("stages of the cached clone (ms):", {k: round(v, 1) for k, v in again.timings.stages_ms.items()})
    print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    engine.close()
    print(f"{len(failures)} failed" if failures else "all checks passed")
    return 1 if failures else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="the issue-25 speed table (see the module docstring)")
    parser.add_argument("--parts", default=",".join(PARTS), help="with --all: which parts, comma-separated")
    parser.add_argument("--dry-run", action="store_true", help="with --all: tiny sizes on the CPU (the test suite)")
    parser.add_argument("--dtype", default="auto", help="engine check: the engine's dtype")
    parser.add_argument("--no-tf32", action="store_true", help="engine check: TF32 off")
    args = parser.parse_args(argv)
    if args.dry_run and not args.all:
        parser.error("--dry-run goes with --all")
    return run_all(args) if args.all else run_engine(args)


if __name__ == "__main__":
    sys.exit(main())
