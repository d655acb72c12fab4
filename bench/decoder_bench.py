"""Benchmark: decoder (flow + HiFT) time for 3 s / 10 s of generated speech at the shipped size.

Builds a ``CosyVoice-300M-25Hz`` folder with the shipped hyper-parameters (flow 153.75 M, HiFT
20.8 M parameters) and seeded random weights in a temporary directory, loads it through
``AudioDecoder.from_dir`` (the real loader), and times ``token2wav`` with a 4.66 s prompt (the
fixture clip's real mel and a matching 38-group random token prompt). Reports, per setting,
count / median / p90 / p99 / max of the total and of the encoder, flow and vocoder stages, the
real-time factor (decode seconds per generated second), and the speed of 5 Euler steps as a ratio
against 10 steps measured in the same process. No warm-up runs are counted.

    .venv/bin/python bench/decoder_bench.py [--device cpu] [--dtype float32] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import ROOT, environment_header, inline, mixed_tokens, summary


from core.audio_io import load_audio
from decoder.config import parse_decoder_config
from decoder.flow import FlowDecoder
from decoder.model import AudioDecoder
from decoder.vocoder import HiFTGenerator
from core.timings import Timer

FIXTURES = ROOT / "tests" / "fixtures"

# The shipped hyper-parameters (pipeline.md §3.1), shared with tests/test_decoder_flow.py.
SHIPPED_YAML = (FIXTURES / "decoder" / "cosyvoice_shipped.yaml").read_text()


def build_folder(folder: Path) -> None:
    """Shipped-size yaml + seeded random flow/HiFT weights (safetensors) + the tiny CAM++."""
    from safetensors.torch import save_file

    cfg = parse_decoder_config(SHIPPED_YAML)
    (folder / "cosyvoice.yaml").write_text(SHIPPED_YAML)
    torch.manual_seed(0)
    flow, hift = FlowDecoder(cfg.flow), HiFTGenerator(cfg.hift)
    # Matrices N(0, 0.02) (the rest keeps torch's default init): keeps the 16-block DiT's
    # activations finite over 10 Euler steps, so no inf/denormal arithmetic skews the timing.
    with torch.no_grad():
        for p in flow.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    save_file({k: v.contiguous() for k, v in flow.state_dict().items()}, str(folder / "flow.safetensors"))
    save_file({k: v.contiguous() for k, v in hift.state_dict().items()}, str(folder / "hift.safetensors"))
    shutil.copy(FIXTURES / "decoder" / "campplus.onnx", folder / "campplus.onnx")



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--seconds", default="3,10", help="generated seconds to time, comma-separated")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    print(environment_header(device, args.dtype, [f"repeats {args.repeats}"]))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        build_folder(folder)
        t1 = time.perf_counter()
        decoder = AudioDecoder.from_dir(folder, device=device, dtype=dtype)
        t2 = time.perf_counter()
    n_flow = sum(p.numel() for p in decoder.flow.parameters())
    n_hift = sum(p.numel() for p in decoder.hift.parameters())
    print(f"params: flow {n_flow / 1e6:.2f} M, hift {n_hift / 1e6:.2f} M | build+save {t1 - t0:.1f} s | "
          f"from_dir {t2 - t1:.2f} s")
    features = decoder.prompt_features(load_audio(FIXTURES / "prompt_22k.wav"))
    rng = np.random.default_rng(0)
    prompt = mixed_tokens(38, rng)                       # 4.56 s of prompt tokens, like the fixture clip
    decoder.token2wav(mixed_tokens(5, rng), prompt, features, seed=0, n_steps=1)  # warm-up

    rows = []
    for seconds in [float(s) for s in args.seconds.split(",")]:
        groups = int(round(seconds / 0.12))
        tokens = mixed_tokens(groups, rng)
        audio_s = groups * 3 * 2 * 480 / 24000
        totals: dict[int, list[float]] = {}
        for steps in (10, 5):
            runs, parts = [], {"decoder_encoder": [], "decoder_flow": [], "decoder_vocoder": []}
            for rep in range(args.repeats):
                timer = Timer()
                start = time.perf_counter()
                decoder.token2wav(tokens, prompt, features, seed=rep, n_steps=steps,
                                  timer=timer)
                runs.append(time.perf_counter() - start)
                for k, v in timer.finish().stages_ms.items():
                    parts[k].append(v / 1000.0)
            totals[steps] = runs
            print(f"\n{audio_s:.2f} s generated, {steps} Euler steps: total s {inline(summary(runs), 3)} | "
                  f"RTF median {np.median(runs) / audio_s:.3f}")
            for k, v in parts.items():
                print(f"    {k:16s} s {inline(summary(v), 3)}")
            rows.append((audio_s, steps, np.median(runs), np.median(runs) / audio_s,
                         *(np.median(parts[k]) for k in parts)))
        print(f"  5 steps vs 10 steps: {np.median(totals[10]) / np.median(totals[5]):.2f}x faster (median total)")
    print("\n| generated s | steps | median s | RTF | encoder s | flow s | vocoder s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]:.2f} | {r[1]} | {r[2]:.2f} | {r[3]:.3f} | {r[4]:.3f} | {r[5]:.2f} | {r[6]:.3f} |")


if __name__ == "__main__":
    main()
