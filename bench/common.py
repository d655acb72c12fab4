"""What every benchmark in bench/ shares: the run's identity and the way timings are summarised.

Owns: ``git_sha`` (the revision a number was measured at, ``+dirty`` when the tree differs),
``environment_header`` (the first line each benchmark prints: git sha, device, torch version,
dtype, threads), ``summary`` (count, median, p90, p99, max of a list of timings; never a mean)
with its two text forms (``cells`` for markdown rows, ``inline`` for ``key=value`` lines), the
timing loops ``time_ms``, ``repeat_ms`` and ``interleaved``, and the synthetic inputs of random-weight
runs: ``clone_prompt`` (LLM prompt ids shaped like a clone prompt) and ``mixed_tokens`` (valid vq02/vq06
audio tokens for the decoder).

Does not own: what a benchmark measures, its baselines, ratios or table layout beyond those
five columns; those stay in each script.

The scripts are run as ``.venv/bin/python bench/<name>.py`` from the repository root; Python
puts bench/ first on ``sys.path`` for such a run, so they import this module as ``common``.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def git_sha(paths: Sequence[str] = ()) -> str:
    """The short HEAD revision, with ``+dirty`` when the working tree differs from it.

    Parameters
    ----------
    paths: limit the dirty check to these paths (relative to the repository root); empty means
        the whole tree (untracked files count).

    Returns
    -------
    e.g. ``"216313c"`` or ``"216313c+dirty"``; ``"unknown"`` outside a git checkout or without git.
    """
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *paths], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def device_name(device: object = "cpu") -> str:
    """A readable name for ``device`` (a ``torch.device`` or its string): the GPU model for CUDA,
    else the CPU's processor name (or machine type where the platform reports none)."""
    if str(device).startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine() or "cpu"


def environment_header(device: object = "cpu", dtype: object = "float32", extra: Iterable[str] = ()) -> str:
    """The line a benchmark prints first, so that a number can be traced to where it was measured.

    Parameters
    ----------
    device: the device the timed work runs on (``torch.device`` or string).
    dtype: the compute dtype (``torch.dtype`` or string; ``torch.`` is dropped).
    extra: further ``" | "``-separated fields the script adds (model size, options, ...).

    Returns
    -------
    ``git <sha> | device <device> (<name>, <n> cores) | torch <version> | dtype <dtype> |
    threads <torch intra-op threads>[ | <extra>...]``
    """
    import torch  # imported here: importing this module stays cheap

    fields = [f"git {git_sha()}", f"device {device} ({device_name(device)}, {os.cpu_count()} cores)",
              f"torch {torch.__version__}", f"dtype {str(dtype).replace('torch.', '')}",
              f"threads {torch.get_num_threads()}", *extra]
    return " | ".join(fields)


def summary(values_ms: Sequence[float]) -> dict:
    """Count, median, p90, p99 and max of timings (numpy's linear percentiles; no mean).

    Parameters
    ----------
    values_ms: one timing per run, in ms by convention (the unit is kept: seconds in, seconds out).

    Returns
    -------
    ``{"count": int, "median": float, "p90": float, "p99": float, "max": float}``

    Raises
    ------
    ValueError: no values.
    """
    a = np.asarray(values_ms, dtype=float)
    if a.size == 0:
        raise ValueError("summary() needs at least one timing")
    return {"count": int(a.size), "median": float(np.median(a)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max())}


def cells(s: dict, digits: int = 1) -> str:
    """``summary`` as markdown cells: ``count | median | p90 | p99 | max`` (no outer pipes)."""
    return " | ".join([str(s["count"])] + [f"{s[k]:.{digits}f}" for k in ("median", "p90", "p99", "max")])


def inline(s: dict, digits: int = 1) -> str:
    """``summary`` as one line: ``n=<count> median=... p90=... p99=... max=...``."""
    return f"n={s['count']} " + " ".join(f"{k}={s[k]:.{digits}f}" for k in ("median", "p90", "p99", "max"))


def time_ms(fn: Callable[[], object]) -> float:
    """Wall time of one call of ``fn``, in ms."""
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000.0


def repeat_ms(fn: Callable[[], object], n: int, warmup: int = 0) -> list[float]:
    """Call ``fn`` ``warmup`` times untimed, then ``n`` times; the ``n`` wall times in ms."""
    for _ in range(warmup):
        fn()
    return [time_ms(fn) for _ in range(n)]


def interleaved(fns: dict[str, Callable[[], object]], n: int, warmup: int = 1) -> dict[str, list[float]]:
    """Time each of ``fns`` ``n`` times (ms), taking turns, so that load from other jobs hits all alike.

    The first ``warmup`` rounds run every function but are not kept.
    """
    out: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + n):
        for name, fn in fns.items():
            ms = time_ms(fn)
            if i >= warmup:
                out[name].append(ms)
    return out


def clone_prompt(rng: np.random.Generator, n: int) -> tuple[int, ...]:
    """About ``n`` ids shaped like a clone prompt: special ids, text ids, then audio ids in 2:3 groups."""
    text = rng.integers(100, 60000, size=max(1, n // 5)).tolist()
    audio = []
    while len(text) + len(audio) + 6 < n:
        slot = len(audio) % 5
        audio.append(65536 + int(rng.integers(0, 1024) if slot < 2 else 1024 + rng.integers(0, 4096)))
    return tuple([1, 4] + text + audio + [3, 4, 77, 78])


def mixed_tokens(groups: int, rng: np.random.Generator) -> list[int]:
    """``groups`` groups of 2 vq02 + 3 vq06 decoder tokens (0.12 s of speech each), valid and random."""
    out: list[int] = []
    for _ in range(groups):
        out += [int(x) for x in rng.integers(0, 1024, 2)] + [int(x) for x in rng.integers(1024, 5120, 3)]
    return out
