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
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from audio_io import load_audio  # noqa: E402
from decoder.config import parse_decoder_config  # noqa: E402
from decoder.flow import FlowDecoder  # noqa: E402
from decoder.model import AudioDecoder  # noqa: E402
from decoder.vocoder import HiFTGenerator  # noqa: E402
from timings import Timer  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"

SHIPPED_YAML = """\
mel_conf: {num_mels: 80, n_fft: 1920, hop_size: 480, win_size: 1920, sampling_rate: 24000, fmin: 0, fmax: 8000}
flow: !new:stepvocoder.cosyvoice2.flow.flow.CausalMaskedDiffWithXvec
    input_size: 512
    output_size: 80
    spk_embed_dim: 192
    output_type: mel
    vocab_size: 5121
    input_embedding: !new:stepvocoder.cosyvoice2.embedding.dual_codebook.DualCodebookEmbedding
        {vocab_size: 5121, input_size: 512}
    encoder: !new:stepvocoder.cosyvoice2.transformer.upsample_encoder_v2.UpsampleConformerEncoderV2
        {input_size: 512, output_size: 512, input_layer: linear, pre_lookahead_len: 3, num_blocks: 6,
         num_up_blocks: 4, up_stride: 2, up_scale_factor: 2, attention_heads: 8,
         pos_enc_layer_type: rel_pos_espnet, selfattention_layer_type: rel_selfattn, key_bias: true,
         linear_units: 2048, dropout_rate: 0.1, positional_dropout_rate: 0.1, attention_dropout_rate: 0.1,
         normalize_before: true}
    decoder: !new:stepvocoder.cosyvoice2.flow.flow_matching.CausalConditionalCFM
        inference_cfg_rate: 0.7
        estimator: !new:stepvocoder.cosyvoice2.flow.decoder_dit.DiT
            {in_channels: 320, out_channels: 80, mlp_ratio: 4.0, depth: 16, num_heads: 8, head_dim: 64,
             hidden_size: 512}
hift: !new:stepvocoder.cosyvoice2.hifigan.generator.HiFTGenerator
    in_channels: 80
    base_channels: 512
    nb_harmonics: 8
    sampling_rate: 24000
    nsf_alpha: 0.1
    nsf_sigma: 0.003
    nsf_voiced_threshold: 10
    upsample_rates: [8, 5, 3]
    upsample_kernel_sizes: [16, 11, 7]
    istft_params: {n_fft: 16, hop_len: 4}
    resblock_kernel_sizes: [3, 7, 11]
    resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    source_resblock_kernel_sizes: [7, 7, 11]
    source_resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    lrelu_slope: 0.1
    audio_limit: 0.99
    f0_predictor: !new:stepvocoder.cosyvoice2.hifigan.f0_predictor.ConvRNNF0Predictor
        {num_class: 1, in_channels: 80, cond_channels: 512}
"""


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


def mixed_tokens(groups: int, rng: np.random.Generator) -> list[int]:
    out: list[int] = []
    for _ in range(groups):
        out += [int(x) for x in rng.integers(0, 1024, 2)] + [int(x) for x in rng.integers(1024, 5120, 3)]
    return out


def stats(values: list[float]) -> str:
    a = np.asarray(values)
    return (f"n={a.size} median={np.median(a):.3f} p90={np.percentile(a, 90):.3f} "
            f"p99={np.percentile(a, 99):.3f} max={a.max():.3f}")


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
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        sha = "unknown"
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"git {sha} | torch {torch.__version__} | device {device} ({name}) | dtype {args.dtype} | "
          f"threads {torch.get_num_threads()} | repeats {args.repeats}")
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
    decoder.token2wav(mixed_tokens(5, rng), prompt, features.mel, features.embedding, seed=0, n_steps=1)  # warm-up

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
                decoder.token2wav(tokens, prompt, features.mel, features.embedding, seed=rep, n_steps=steps,
                                  timer=timer)
                runs.append(time.perf_counter() - start)
                for k, v in timer.finish().stages_ms.items():
                    parts[k].append(v / 1000.0)
            totals[steps] = runs
            print(f"\n{audio_s:.2f} s generated, {steps} Euler steps: total s {stats(runs)} | "
                  f"RTF median {np.median(runs) / audio_s:.3f}")
            for k, v in parts.items():
                print(f"    {k:16s} s {stats(v)}")
            rows.append((audio_s, steps, np.median(runs), np.median(runs) / audio_s,
                         *(np.median(parts[k]) for k in parts)))
        print(f"  5 steps vs 10 steps: {np.median(totals[10]) / np.median(totals[5]):.2f}x faster (median total)")
    print("\n| generated s | steps | median s | RTF | encoder s | flow s | vocoder s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]:.2f} | {r[1]} | {r[2]:.2f} | {r[3]:.3f} | {r[4]:.3f} | {r[5]:.2f} | {r[6]:.3f} |")


if __name__ == "__main__":
    main()
