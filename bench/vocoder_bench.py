"""Benchmark: HiFT vocoder and prompt frontend at the shipped size, on CPU by default.

HiFT is built with the shipped hyper-parameters (20.8 M parameters, seeded random weights) and
times ``HiFTGenerator.inference`` for 3 s and 10 s of 24 kHz audio in two variants, measured
in the same process and interleaved so that load from other jobs hits them alike:
  * baseline: as loaded, weight norm recomputed inside every conv call (what the reference does);
  * folded:   after ``HiFTGenerator.fold_weight_norm()``.
The frontend (peak limit, 24 kHz mel, fbank + tiny CAM++ stand-in) is timed on 5 s and 20 s
clips at 22.05 kHz (the real CAM++ is larger; only the feature part is representative).
Reports count / median / p90 / p99 / max in ms, the real-time factor and speed ratios.

    .venv/bin/python bench/vocoder_bench.py [--device cpu|cuda] [--dtype float32|bfloat16] [--repeats 7] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from common import ROOT, environment_header, inline, repeat_ms, summary


from core.audio_io import Audio, load_audio
from decoder.frontend import MelConfig, PromptFrontend
from decoder.vocoder import HiFTConfig, HiFTGenerator
from core.onnx_session import OnnxOptions

FIXTURES = ROOT / "tests" / "fixtures"


def folded_copy(model: HiFTGenerator) -> HiFTGenerator:
    clone = HiFTGenerator(model.cfg).eval()
    clone.load_state_dict(model.state_dict())
    return clone.fold_weight_norm()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_variant(model: HiFTGenerator, mel: torch.Tensor) -> float:
    _sync(mel.device)
    start = time.perf_counter()
    model.inference(mel, generator=torch.Generator(mel.device).manual_seed(0))
    _sync(mel.device)
    return (time.perf_counter() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(environment_header(args.device, args.dtype))
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    torch.manual_seed(0)
    model = HiFTGenerator(HiFTConfig()).eval()
    print(f"HiFT parameters: {sum(p.numel() for p in model.parameters()):,}")
    variants = {"baseline": model, "folded": folded_copy(model)}
    variants = {name: m.to(device=device, dtype=dtype) for name, m in variants.items()}
    for seconds in (3, 10):
        mel = (torch.randn(1, 80, seconds * 50, generator=torch.Generator().manual_seed(1)) - 5).to(device)
        for name, m in variants.items():  # warm-up, not counted
            run_variant(m, mel)
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, m in variants.items():
                times[name].append(run_variant(m, mel))
        base = np.median(times["baseline"])
        print(f"\nHiFT, {seconds} s of audio ({seconds * 50} mel frames):")
        for name, ms in times.items():
            med = np.median(ms)
            print(f"  {name:8s} {inline(summary(ms))} ms | RTF {med / 1000 / seconds:.3f} | "
                  f"speed x{base / med:.2f} vs baseline")

    frontend = PromptFrontend(MelConfig(), FIXTURES / "decoder" / "campplus.onnx", OnnxOptions())
    clip = load_audio(FIXTURES / "prompt_22k.wav")
    for seconds in (5, 20):
        samples = np.resize(clip.samples, int(seconds * clip.sample_rate))
        audio = Audio(samples, clip.sample_rate)
        ms = repeat_ms(lambda: frontend.features(audio), args.repeats, warmup=1)
        print(f"\nfrontend features, {seconds} s clip at {clip.sample_rate} Hz: {inline(summary(ms))} ms")


if __name__ == "__main__":
    main()
