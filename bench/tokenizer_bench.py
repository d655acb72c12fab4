"""Benchmark of the Step-Audio tokenizer: cache miss vs hit, and the cold path vs a reference-style baseline.

Run from the repository root:  .venv/bin/python bench/tokenizer_bench.py [--device cpu] [--no-real-size]
                               [--encoder-modes-only] [--mode-seconds 5,15,30] [--mode-reps 2]

Models: the tiny fixture tokenizer (tests/fixtures/tokenizer) and a real-size random-weight
Paraformer-large streaming encoder (50 SANM blocks, 512-d, 2048 units, 4 heads; built with
funasr's ParaformerStreaming and written to a temporary folder in the real layout). The real-size
folder keeps the tiny S3 ONNX stand-in, a random [1024, 512] codebook, and a minimal decoder
(the tokenizer drops decoder and predictor after loading, so their size does not matter).

Clips: the 22.05 kHz fixture prompt tiled to 5 s and 15 s. Requests go through the engine's
cache-first path (``tts_engine.prompt_fetch.fetch_prompt`` with the ``tokens`` kind; the tokenizer itself
is pure). Every cold request uses a slightly rescaled copy (a new digest, the same tokens), so it
misses the cache; warm requests repeat one clip.

Baseline ("reference-style", what upstream does per request): the same preprocessing, a 32-bit
float in-memory WAV round trip before the Paraformer, the streaming (chunk-by-chunk) encoder
whatever ``--vq02-encoder`` says, and a fresh ONNX Runtime session with
default SessionOptions for vq06; no cache. Cold and baseline requests alternate so that load from
other jobs on the machine hits both alike.

Encoder modes (real-size model): cold tokenization of 5, 15 and 30 s clips with the vq02 encoder
``parallel`` vs ``streaming`` (``--vq02-encoder``), one loaded model switched between the paths,
requests alternating; both must give the same tokens. Also the seconds each miss stored as the
cache entry's cost (the hits' "time saved"), the largest ``enc_out`` difference between the paths,
and each path's peak resident memory while encoding the longest clip (the kernel's high-water
mark, reset through /proc/self/clear_refs before each path; Linux only).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import soundfile as sf
import torch

from common import ROOT, cells, environment_header, summary, time_ms
from core.audio_io import Audio, load_audio
from core.settings import FUNASR_SUBDIR
from core.timings import Timer
from funasr_cache.store import PromptCache, audio_digest
from tokenizer import step_audio as tk
from tts_engine.prompt_bundle import tokens_kind
from tts_engine.prompt_fetch import fetch_prompt

FIXTURE = ROOT / "tests" / "fixtures" / "tokenizer" / "Step-Audio-Tokenizer"
PROMPT = ROOT / "tests" / "fixtures" / "prompt_22k.wav"

REAL_ENCODER = dict(output_size=512, attention_heads=4, linear_units=2048, num_blocks=50, dropout_rate=0.1,
                    positional_dropout_rate=0.1, attention_dropout_rate=0.1, input_layer="pe_online",
                    pos_enc_class="SinusoidalPositionEncoder", normalize_before=True, kernel_size=11,
                    sanm_shfit=0, selfattention_layer_type="sanm", chunk_size=[12, 15], stride=[8, 10],
                    pad_left=[0, 0], encoder_att_look_back_factor=[4, 4], decoder_att_look_back_factor=[1, 1])


def row(label: str, s: dict) -> str:
    return f"| {label} | {cells(s, 1)} |"


def build_real_size(folder: Path) -> Path:
    """Write a real-size random-weight tokenizer folder (see module docstring); returns it."""
    import funasr  # noqa: F401 - registers the model classes
    import yaml
    from funasr.register import tables
    from safetensors.torch import save_file

    sub = folder / FUNASR_SUBDIR
    sub.mkdir(parents=True)
    fixture_sub = FIXTURE / FUNASR_SUBDIR
    conf = yaml.safe_load((fixture_sub / "config.yaml").read_text())
    conf["encoder_conf"] = REAL_ENCODER
    conf["decoder_conf"].update(num_blocks=1, att_layer_num=1)
    conf["predictor_conf"]["idim"] = 512
    (sub / "config.yaml").write_text(yaml.safe_dump(conf))
    for name in ("configuration.json", "tokens.json", "am.mvn"):
        (sub / name).write_bytes((fixture_sub / name).read_bytes())
    vocab = len(json.loads((fixture_sub / "tokens.json").read_text()))
    torch.manual_seed(0)
    model = tables.model_classes.get(conf["model"])(
        **conf["model_conf"], encoder=conf["encoder"], encoder_conf=conf["encoder_conf"], decoder=conf["decoder"],
        decoder_conf=conf["decoder_conf"], predictor=conf["predictor"], predictor_conf=conf["predictor_conf"],
        ctc_conf=dict(dropout_rate=0.0, ctc_type="builtin", reduce=True, ignore_nan_grad=True),
        input_size=560, vocab_size=vocab)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(sub / "model.safetensors"))
    n_enc = sum(p.numel() for p in model.encoder.parameters())
    print(f"real-size encoder: {n_enc / 1e6:.1f} M parameters", flush=True)
    rng = np.random.default_rng(0)
    np.save(folder / "linguistic_tokenizer.npy", rng.standard_normal((1024, 512)).astype(np.float32))
    (folder / "speech_tokenizer_v1.onnx").write_bytes((FIXTURE / "speech_tokenizer_v1.onnx").read_bytes())
    return folder


def real_size_folder(parent: Path) -> Path:
    """The real-size tokenizer folder under ``parent``, built there unless a complete one exists."""
    folder = Path(parent) / "Step-Audio-Tokenizer"
    if (folder / "speech_tokenizer_v1.onnx").is_file():
        return folder
    return build_real_size(folder)


def baseline_tokenize(tok: tk.StepAudioTokenizer, audio: Audio, onnx_path: Path) -> tk.Tokens:
    """Reference-style request: WAV round trip before FunASR, a fresh default ORT session, no cache."""
    wav = tok.preprocess(audio)
    buffer = io.BytesIO()
    sf.write(buffer, wav, 16000, format="WAV", subtype="FLOAT")
    buffer.seek(0)
    reloaded, _ = sf.read(buffer, dtype="float32")
    vq02 = tk.kmeans_assign(tok.paraformer.encode(reloaded, mode="streaming").enc_out.cpu(), tok.codebook.cpu())
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    vq06: list[int] = []
    for chunk in tk.vq06_chunks(wav):
        mel = tk.whisper_log_mel(chunk)
        vq06 += session.run(None, {names[0]: mel, names[1]: np.array([mel.shape[2]], np.int32)})[0].reshape(-1).tolist()
    return tk.Tokens(tuple(int(c) for c in vq02), tuple(vq06))


def clip(seconds: float) -> Audio:
    base = load_audio(PROMPT)
    n = int(seconds * base.sample_rate)
    return Audio(np.resize(base.samples, n), base.sample_rate)


def bench_model(name: str, folder: Path, device: str, cold_reps: int, warm_reps: int) -> list[str]:
    start = time.perf_counter()
    tok = tk.StepAudioTokenizer.load(folder, device=device)
    load_s = time.perf_counter() - start
    cache, kind = PromptCache(tempfile.mkdtemp()), tokens_kind(tok)

    def request(audio: Audio, timer: Timer):
        """What a request does: hash the clip, then tokens cache-first; (tokens, hit)."""
        return fetch_prompt(cache, kind, audio, audio_digest(audio.samples, audio.sample_rate), timer)

    lines = [f"\n### {name} (load {load_s:.2f} s)\n",
             "| clip / path | n | median ms | p90 ms | p99 ms | max ms |", "|---|---|---|---|---|---|"]
    ratios = []
    for seconds in (5, 15):
        audio = clip(seconds)
        # warm-up (not reported); both paths must give the same tokens
        warm_up = tok.tokenize(Audio(audio.samples * 0.5, audio.sample_rate))
        assert baseline_tokenize(tok, audio, folder / "speech_tokenizer_v1.onnx") == warm_up
        cold, base, stages = [], [], []
        for rep in range(cold_reps):
            variant = Audio(audio.samples * np.float32(1.0 - 1e-4 * (rep + 1)), audio.sample_rate)
            result_holder, timer = {}, Timer()
            cold.append(time_ms(lambda: result_holder.setdefault("r", request(variant, timer))))
            assert not result_holder["r"][1]
            stages.append(timer.finish().stages_ms)
            base.append(time_ms(lambda: baseline_tokenize(tok, variant, folder / "speech_tokenizer_v1.onnx")))
        warm = [time_ms(lambda: request(variant, Timer())) for _ in range(warm_reps)]
        s_cold, s_base, s_warm = summary(cold), summary(base), summary(warm)
        lines += [row(f"{seconds} s baseline (reference-style)", s_base), row(f"{seconds} s cold (miss)", s_cold),
                  row(f"{seconds} s warm (hit)", s_warm)]
        stage_medians = {k: float(np.median([s[k] for s in stages])) for k in stages[0]}
        ratios.append((seconds, s_base["median"] / s_cold["median"], s_cold["median"] / s_warm["median"],
                       stage_medians))
    lines.append("")
    for seconds, base_ratio, hit_ratio, stage_medians in ratios:
        parts = ", ".join(f"{k} {v:.1f}" for k, v in stage_medians.items())
        lines.append(f"- {seconds} s: cold is **{base_ratio:.2f}x** as fast as the baseline (median/median); "
                     f"a hit is **{hit_ratio:,.0f}x** faster than a miss. Miss stages (median ms): {parts}.")
    return lines


def _proc_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) if match else 0


def peak_memory_mib(fn) -> float | None:
    """Resident memory ``fn()`` added at its peak (MiB), or None where the kernel cannot reset the mark."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current VmRSS
    except OSError:
        return None
    before = _proc_kib("VmRSS")
    fn()
    return (_proc_kib("VmHWM") - before) / 1024.0


def peak_memory_child(folder: Path, device: str, mode: str, seconds: float) -> None:
    """In a fresh process: load, warm up on 2 s, then print the peak memory of encoding ``seconds``."""
    tok = tk.StepAudioTokenizer.load(folder, device=device, vq02_encoder=mode)
    tok.paraformer.encode(tok.preprocess(clip(2.0)))
    wav = tok.preprocess(clip(seconds))
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        tok.paraformer.encode(wav)
        print(json.dumps({"mib": (torch.cuda.max_memory_allocated() - base) / 2**20}))
    else:
        print(json.dumps({"mib": peak_memory_mib(lambda: tok.paraformer.encode(wav))}))


def peak_memory_by_mode(folder: Path, device: str, seconds: float, threads: int) -> dict[str, float | None]:
    """Each encoder path's peak memory for one clip, each in its own process (a clean heap).

    glibc's mmap threshold is pinned so that freed large blocks go back to the kernel: the
    resident high-water mark then follows the live tensors, not the heap's leftovers.
    """
    import os
    import subprocess
    import sys

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "PYTHONPATH": str(ROOT)}
    out = {}
    for mode in ("streaming", "parallel"):
        done = subprocess.run([sys.executable, __file__, "--peak-memory-child", mode, "--real-size-dir",
                               str(folder.parent), "--device", device, "--threads", str(threads),
                               "--mode-seconds", str(seconds)], env=env, capture_output=True, text=True)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
        out[mode] = json.loads(lines[-1])["mib"] if done.returncode == 0 and lines else None
    return out


def bench_encoder_modes(folder: Path, device: str, reps: int, seconds_list: list[float]) -> list[str]:
    """Cold tokenization, parallel vs streaming vq02 encoder, one model, alternating requests."""
    tok = tk.StepAudioTokenizer.load(folder, device=device)
    cache, kind = PromptCache(tempfile.mkdtemp()), tokens_kind(tok)
    modes = ("parallel", "streaming")
    lines = ["\n### vq02 encoder: parallel vs streaming, real-size encoder (random weights), cold requests\n",
             "| clip / encoder | n | median ms | p90 ms | p99 ms | max ms | vq02_encode median ms | stored cost median s |",
             "|---|---|---|---|---|---|---|---|"]
    notes, counter, last_enc = [], [0], {}
    encode = tok.paraformer.encode

    def encode_and_keep(wav, *args, **kwargs):   # instrumentation: keep each path's latest enc_out
        out = encode(wav, *args, **kwargs)
        last_enc[tok.paraformer.encoder_mode] = out.enc_out
        return out

    tok.paraformer.encode = encode_and_keep

    def cold(audio: Audio, mode: str, out: dict) -> None:
        tok.paraformer.encoder_mode = mode
        counter[0] += 1
        variant = Audio(audio.samples * np.float32(1.0 - 1e-5 * counter[0]), audio.sample_rate)  # a new digest
        digest, timer = audio_digest(variant.samples, variant.sample_rate), Timer()
        start = time.perf_counter()
        tokens, hit = fetch_prompt(cache, kind, variant, digest, timer)   # what a request does: cache-first
        out.setdefault("ms", []).append((time.perf_counter() - start) * 1000.0)
        assert not hit
        out.setdefault("vq02", []).append(timer.finish().stages_ms["tokenize_vq02"])
        out.setdefault("cost", []).append(cache.get(kind.name, kind.namespace, digest).cost_s)
        out.setdefault("tokens", set()).add(tokens)

    for mode in modes:                                   # warm-up, not reported
        cold(clip(2.0), mode, {})
    for seconds in seconds_list:
        audio = clip(seconds)
        runs = {m: {} for m in modes}
        for rep in range(reps):
            for mode in (modes if rep % 2 == 0 else modes[::-1]):
                cold(audio, mode, runs[mode])
        for mode in modes:
            r = runs[mode]
            lines.append(f"| {seconds:g} s {mode} | {cells(summary(r['ms']), 1)} | {np.median(r['vq02']):.1f} | "
                         f"{np.median(r['cost']):.2f} |")
        tokens = runs["parallel"]["tokens"] | runs["streaming"]["tokens"]
        enc = dict(last_enc)
        codes = {m: tk.kmeans_assign(enc[m], tok.codebook) for m in modes}
        ratio = np.median(runs["streaming"]["ms"]) / np.median(runs["parallel"]["ms"])
        enc_ratio = np.median(runs["streaming"]["vq02"]) / np.median(runs["parallel"]["vq02"])
        notes.append(f"- {seconds:g} s: parallel is **{ratio:.2f}x** as fast as streaming per cold request "
                     f"(vq02_encode alone {enc_ratio:.2f}x); tokens identical across all requests: "
                     f"{len(tokens) == 1}; max |enc_out difference| "
                     f"{(enc['parallel'] - enc['streaming']).abs().max().item():.2e}, "
                     f"{int((codes['parallel'] != codes['streaming']).sum())} of {len(codes['parallel'])} codes differ.")
        print("\n".join(lines[-2:] + notes[-1:]), flush=True)
    longest = max(seconds_list)
    peaks = peak_memory_by_mode(folder, device, longest, torch.get_num_threads())
    kind = "CUDA memory allocated" if str(device).startswith("cuda") else "resident memory"
    weights = sum(p.numel() * p.element_size() for p in tok.paraformer.model.parameters()) / 2**20
    notes.append(f"- Peak {kind} added while encoding the {longest:g} s clip, each path in a fresh process "
                 f"after a 2 s warm-up: streaming {_mib(peaks['streaming'])}, parallel {_mib(peaks['parallel'])} "
                 f"(on top of the {weights:.0f} MiB of weights loaded before).")
    return lines + [""] + notes


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cold-reps", type=int, default=10)
    parser.add_argument("--real-cold-reps", type=int, default=3)
    parser.add_argument("--warm-reps", type=int, default=200)
    parser.add_argument("--no-real-size", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--encoder-modes-only", action="store_true",
                        help="only the parallel vs streaming vq02 encoder comparison (real-size model)")
    parser.add_argument("--mode-seconds", default="5,15,30", help="clip lengths for the encoder-mode comparison")
    parser.add_argument("--mode-reps", type=int, default=2, help="cold requests per clip and encoder mode")
    parser.add_argument("--real-size-dir", type=Path, default=None,
                        help="reuse (or build once into) this folder for the real-size model")
    parser.add_argument("--peak-memory-child", choices=("parallel", "streaming"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peak_memory_child:
        peak_memory_child(real_size_folder(args.real_size_dir), args.device, args.peak_memory_child,
                          float(args.mode_seconds.split(",")[-1]))
        return

    header = [environment_header(args.device, "float32", [f"onnxruntime {ort.__version__}"])]
    print(header[0], flush=True)
    if not args.encoder_modes_only:
        lines = header + bench_model("tiny fixture model", FIXTURE, args.device, args.cold_reps, args.warm_reps)
        print("\n".join(lines[1:]), flush=True)
    if args.no_real_size:
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = real_size_folder(args.real_size_dir or Path(tmp))
        if not args.encoder_modes_only:
            more = bench_model("real-size Paraformer-large encoder (random weights)", folder, args.device,
                               args.real_cold_reps, args.warm_reps)
            print("\n".join(more), flush=True)
        seconds = [float(s) for s in args.mode_seconds.split(",")]
        print("\n".join(bench_encoder_modes(folder, args.device, args.mode_reps, seconds)), flush=True)


if __name__ == "__main__":
    main()
