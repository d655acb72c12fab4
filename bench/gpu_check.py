"""GPU smoke check of the whole Step-Audio-EditX engine on tiny random-weight models.

Builds the tiny model root the tests use, loads ``StepAudioEngine`` on CUDA (bfloat16 by default),
and checks what can only be checked on a GPU: TF32 flags after loading, the ONNX providers the
sessions really use, a clone and an edit end to end, seed reproducibility, and that a repeated
prompt is served from the cache. Prints one line per check and exits non-zero on a failure.

Run on a CUDA machine from the repository root: ``python bench/gpu_check.py [--dtype float32]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--no-tf32", action="store_true")
    args = parser.parse_args()

    import numpy as np
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


if __name__ == "__main__":
    sys.exit(main())
