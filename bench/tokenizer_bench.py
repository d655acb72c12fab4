"""Benchmark of the Step-Audio tokenizer: cache miss vs hit, and the cold path vs a reference-style baseline.

Run from the repository root:  .venv/bin/python bench/tokenizer_bench.py [--device cpu] [--no-real-size]

Models: the tiny fixture tokenizer (tests/fixtures/tokenizer) and a real-size random-weight
Paraformer-large streaming encoder (50 SANM blocks, 512-d, 2048 units, 4 heads; built with
funasr's ParaformerStreaming and written to a temporary folder in the real layout). The real-size
folder keeps the tiny S3 ONNX stand-in, a random [1024, 512] codebook, and a minimal decoder
(the tokenizer drops decoder and predictor after loading, so their size does not matter).

Clips: the 22.05 kHz fixture prompt tiled to 5 s and 15 s. Requests go through the engine's
cache-first path (``engine.prompt_fetch.fetch_prompt`` with the ``tokens`` kind; the tokenizer itself
is pure). Every cold request uses a slightly rescaled copy (a new digest, the same tokens), so it
misses the cache; warm requests repeat one clip.

Baseline ("reference-style", what upstream does per request): the same preprocessing, a 32-bit
float in-memory WAV round trip before the Paraformer, and a fresh ONNX Runtime session with
default SessionOptions for vq06; no cache. Cold and baseline requests alternate so that load from
other jobs on the machine hits both alike.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
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
from engine.prompt_bundle import tokens_kind
from engine.prompt_fetch import fetch_prompt
from prompt_cache.funasr_cache import PromptCache, audio_digest
from tokenizer import step_audio as tk

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
    import yaml
    from funasr.register import tables
    from safetensors.torch import save_file
    import funasr  # noqa: F401 - registers the model classes

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


def baseline_tokenize(tok: tk.StepAudioTokenizer, audio: Audio, onnx_path: Path) -> tk.Tokens:
    """Reference-style request: WAV round trip before FunASR, a fresh default ORT session, no cache."""
    wav = tok.preprocess(audio)
    buffer = io.BytesIO()
    sf.write(buffer, wav, 16000, format="WAV", subtype="FLOAT")
    buffer.seek(0)
    reloaded, _ = sf.read(buffer, dtype="float32")
    vq02 = tk.kmeans_assign(tok.paraformer.encode(reloaded).enc_out.cpu(), tok.codebook.cpu())
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cold-reps", type=int, default=10)
    parser.add_argument("--real-cold-reps", type=int, default=3)
    parser.add_argument("--warm-reps", type=int, default=200)
    parser.add_argument("--no-real-size", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)

    header = [environment_header(args.device, "float32", [f"onnxruntime {ort.__version__}"])]
    print(header[0], flush=True)
    lines = header + bench_model("tiny fixture model", FIXTURE, args.device, args.cold_reps, args.warm_reps)
    print("\n".join(lines[1:]), flush=True)
    if not args.no_real_size:
        with tempfile.TemporaryDirectory() as tmp:
            folder = build_real_size(Path(tmp) / "Step-Audio-Tokenizer")
            more = bench_model("real-size Paraformer-large encoder (random weights)", folder, args.device,
                               args.real_cold_reps, args.warm_reps)
        print("\n".join(more), flush=True)


if __name__ == "__main__":
    main()
