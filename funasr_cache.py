"""Persistent prompt cache -- PLACEHOLDER IMPLEMENTATION (issue 2 replaces the internals).

The public API below is the contract other modules code against; keep it stable.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np


@dataclass(frozen=True)
class CacheEntry:
    kind: str
    namespace: str
    digest: str
    payload: Mapping
    arrays: Mapping[str, np.ndarray] = field(default_factory=dict)
    cost_s: float = 0.0
    created_at: float = 0.0


def audio_digest(samples: np.ndarray, sample_rate: int) -> str:
    h = hashlib.blake2b(digest_size=32)
    h.update(str(int(sample_rate)).encode())
    h.update(np.ascontiguousarray(samples, dtype="<f4").tobytes())
    return h.hexdigest()


def fingerprint_files(paths: Iterable[Path]) -> str:
    h = hashlib.blake2b(digest_size=8)
    for p in sorted(Path(x) for x in paths):
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def make_namespace(model: str, fingerprint: str, version: int | str) -> str:
    return f"{model}@{fingerprint}/v{version}"


Compute = Callable[[], "tuple[dict, dict[str, np.ndarray]]"]


class PromptCache:
    def __init__(self, root: Path | str, max_entries: int = 20000, max_bytes: int = 2 * 1024**3,
                 memory_entries: int = 256) -> None:
        self.root = Path(root)
        self._mem: dict[tuple[str, str, str], CacheEntry] = {}
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0

    @classmethod
    def from_settings(cls, settings) -> "PromptCache":
        return cls(settings.cache_dir, settings.cache_max_entries, settings.cache_max_bytes,
                   settings.cache_memory_entries)

    def get(self, kind: str, namespace: str, digest: str) -> CacheEntry | None:
        with self._lock:
            entry = self._mem.get((kind, namespace, digest))
            if entry is None:
                self._misses += 1
            else:
                self._hits += 1
            return entry

    def put(self, kind: str, namespace: str, digest: str, payload: dict, cost_s: float,
            arrays: Mapping[str, np.ndarray] | None = None) -> CacheEntry:
        entry = CacheEntry(kind, namespace, digest, dict(payload), dict(arrays or {}), cost_s, time.time())
        with self._lock:
            self._mem[(kind, namespace, digest)] = entry
        return entry

    def get_or_compute(self, kind: str, namespace: str, digest: str, compute: Compute) -> tuple[CacheEntry, bool]:
        entry = self.get(kind, namespace, digest)
        if entry is not None:
            return entry, True
        start = time.perf_counter()
        payload, arrays = compute()
        return self.put(kind, namespace, digest, payload, time.perf_counter() - start, arrays), False

    def stats(self) -> dict:
        return {"hits": self._hits, "misses": self._misses, "entries": len(self._mem)}

    def clear(self) -> None:
        with self._lock:
            self._mem.clear()
            self._hits = self._misses = 0

    def __len__(self) -> int:
        return len(self._mem)
