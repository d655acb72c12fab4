"""Parity of the parallel vq02 encoder with funasr's streaming loop on the real-size encoder (random weights).

Run from the repository root:  PYTHONPATH=$PWD .venv/bin/python bench/vq02_parity.py [--clips 20] [--threads 1]

A check, not a test (it takes minutes on a 2-core CPU): for each clip both paths encode the same
preprocessed 16 kHz samples with one loaded model; it reports the largest ``enc_out`` difference,
how many vq02 codes differ (target: none), and the smallest nearest/second-nearest centroid margin
so the differences can be read against it. Model: the real-size folder of ``tokenizer_bench.py``
(50 SANM blocks, 512-d, random weights, a random [1024, 512] codebook).

Clips: the fixture prompt at 16 kHz, cut at a random offset to lengths that cover the streaming
loop's edge cases (on a 240 ms chunk boundary, a final chunk under 30 ms, under one chunk, others
up to 8 s), with a random gain and a little noise, then peak-normalised as the tokenizer does.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch

from common import environment_header
from tokenizer_bench import PROMPT, real_size_folder

from core.audio_io import load_audio, resample
from core.settings import FUNASR_SUBDIR
from tokenizer import step_audio as tk
from tokenizer.paraformer_stream import CHUNK_STRIDE, MIN_FINAL_CHUNK, ParaformerStream


def clip_lengths(n: int, rng: np.random.Generator) -> list[int]:
    """Lengths in samples: the edge cases first, then random ones up to 8 s."""
    edge = [8 * CHUNK_STRIDE, 21 * CHUNK_STRIDE, 12 * CHUNK_STRIDE + MIN_FINAL_CHUNK - 1, 5 * CHUNK_STRIDE + 1,
            CHUNK_STRIDE - 1, 33 * CHUNK_STRIDE + 200]
    return (edge + [int(rng.integers(CHUNK_STRIDE, 8 * 16000)) for _ in range(n)])[:n]


def make_clip(source: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    tiled = np.resize(source, len(source) + n)
    start = int(rng.integers(0, len(source)))
    wav = tiled[start:start + n] * rng.uniform(0.2, 1.0) + rng.standard_normal(n) * 0.003
    return tk.energy_norm(wav.astype(np.float32))


def margins(enc: torch.Tensor, codebook: torch.Tensor) -> np.ndarray:
    distances = torch.cdist(enc.float().cpu(), codebook).topk(2, dim=1, largest=False).values
    return (distances[:, 1] - distances[:, 0]).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--real-size-dir", type=Path, default=None,
                        help="reuse (or build once into) this folder for the real-size model")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(environment_header(args.device, "float32"), flush=True)
    rng = np.random.default_rng(args.seed)
    prompt = load_audio(PROMPT)
    source = resample(prompt.samples, prompt.sample_rate, 16000)
    with tempfile.TemporaryDirectory() as tmp:
        folder = real_size_folder(args.real_size_dir or Path(tmp))
        stream = ParaformerStream.load(folder / FUNASR_SUBDIR, args.device)
        codebook = torch.from_numpy(np.load(folder / tk.CODEBOOK_FILE))
        print("| clip | samples | frames | max abs diff | codes differing | min margin |\n|---|---|---|---|---|---|")
        worst, flips, frames = 0.0, 0, 0
        for i, n in enumerate(clip_lengths(args.clips, rng)):
            wav = make_clip(source, n, rng)
            streaming = stream.encode(wav, mode="streaming")
            parallel = stream.encode(wav, mode="parallel")
            assert parallel.chunk_lengths == streaming.chunk_lengths
            diff = (parallel.enc_out - streaming.enc_out).abs().max().item()
            differ = int((tk.kmeans_assign(parallel.enc_out, codebook)
                          != tk.kmeans_assign(streaming.enc_out, codebook)).sum())
            worst, flips, frames = max(worst, diff), flips + differ, frames + len(streaming.enc_out)
            print(f"| {i} | {n} | {len(streaming.enc_out)} | {diff:.2e} | {differ} | "
                  f"{margins(streaming.enc_out, codebook).min():.2e} |", flush=True)
    print(f"\n{args.clips} clips, {frames} frames: largest |enc_out difference| {worst:.2e}; "
          f"{flips} vq02 codes differ.")


if __name__ == "__main__":
    main()
