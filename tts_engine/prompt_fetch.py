"""The one cache-first way to get per-clip prompt work: look it up, or compute it once and store it.

Owns: ``PromptKind`` (how one kind of prompt work is computed, stored and read back) and
``fetch_prompt`` over ``PromptCache.get_or_compute`` (whose single-flight makes concurrent
requests for one new clip compute it once), the policy for a stored entry that cannot be read
(log, recompute, replace), and the stages it records. Used for every prompt kind: tokens and
decoder features (``tts_engine.prompt_bundle``) and the preview voice profile (``preview.engine``).
Does not own: what a kind computes (models), cache mechanics (``funasr_cache``).

Stages added to the caller's timer: ``cache_lookup`` (lookup, waiting for a concurrent request's
computation of the same clip, and the store; compute time excluded), the kind's own stages when
it computes, and its ``hit_stages`` at 0 ms marked cached when served from the cache. A miss
filled from the cache's prompt source (a stored voice's entries in the database) also records
``prompt_store`` (the time of that fill, marked as a hit) and counts ``prompt_store_fills``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Generic, Mapping, TypeVar

import numpy as np

from core.audio_io import Audio
from core.timings import Timer
from funasr_cache.store import CacheEntry, PromptCache

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class PromptKind(Generic[T]):
    """One kind of per-clip prompt work, as :func:`fetch_prompt` caches it.

    ``compute(audio, timer)`` runs the models (recording its own stages); ``to_entry(value)`` gives
    ``(JSON payload, arrays or None)`` to store; ``from_entry(entry)`` rebuilds the value and raises
    ``KeyError``/``TypeError``/``ValueError`` for a malformed entry (which is then recomputed).
    """

    name: str                                   # the cache kind
    namespace: str
    compute: Callable[[Audio, Timer], T]
    to_entry: Callable[[T], "tuple[Mapping, Mapping[str, np.ndarray] | None]"]
    from_entry: Callable[[CacheEntry], T]
    hit_stages: tuple[str, ...] = ()            # recorded at 0 ms, cached, when served from the cache


def fetch_prompt(cache: PromptCache, kind: PromptKind[T], audio: Audio, digest: str, timer: Timer) -> tuple[T, bool]:
    """``(value, hit)`` of ``kind`` for the clip ``audio`` whose cache digest is ``digest``.

    Cache-first: a hit runs no model; a miss computes once per key (concurrent requests wait for
    it and share the result, with hit=False) and stores it. A stored entry that ``from_entry``
    cannot read is logged, recomputed and replaced.

    Raises:
        Whatever ``kind.compute`` raises (InputError for an unusable clip, ModelError).
    """
    computed: list[T] = []
    compute_s = 0.0

    def compute():
        nonlocal compute_s
        start = time.perf_counter()
        computed.append(kind.compute(audio, timer))
        compute_s = time.perf_counter() - start
        return kind.to_entry(computed[0])

    start = time.perf_counter()
    entry, origin = cache.lookup(kind.name, kind.namespace, digest, compute)
    hit = origin in ("hit", "store")   # no model ran for this request
    fill_ms = (time.perf_counter() - start) * 1000.0 if origin == "store" else 0.0
    if computed:
        value = computed[0]
    else:
        try:
            value = kind.from_entry(entry)
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("ignoring a malformed %s cache entry %s (%s); recomputing it", kind.name, digest[:12], exc)
            hit = False
            compute_start = time.perf_counter()
            value = kind.compute(audio, timer)
            compute_s = time.perf_counter() - compute_start
            payload, arrays = kind.to_entry(value)
            cache.put(kind.name, kind.namespace, digest, payload, compute_s, arrays)
    timer.record("cache_lookup", (time.perf_counter() - start - compute_s) * 1000.0 - fill_ms)
    if origin == "store":
        timer.record("prompt_store", fill_ms, cached=True)
        timer.count("prompt_store_fills", 1)
    if hit:
        for stage in kind.hit_stages:
            timer.record(stage, 0.0, cached=True)
    log.debug("prompt %s %s %s", kind.name, origin if hit or computed else "shared", digest[:12])
    return value, hit
