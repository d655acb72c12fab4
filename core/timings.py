"""Per-stage timing of one request.

Owns: measuring stages with ``perf_counter``, the frozen ``StageTimings`` record that travels in
results, and its one-line log format. Every line starts with ``timing`` so that
``grep '^.*timing '`` finds them all, e.g.::

    timing clone req=3f2a total_ms=1203.4 rtf=0.41 stages=decode_audio:2.1,hash:0.4,tokens:0.3(hit),...

Does not own: deciding what a stage is (callers name them).
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Iterator, Mapping


@dataclass(frozen=True)
class StageTimings:
    """Milliseconds per stage in the order they ran, which stages came from the cache, and counters.

    ``counters`` carries numbers that are not durations (LLM tokens, tokens/s, audio seconds, RTF).
    """

    stages_ms: Mapping[str, float] = field(default_factory=dict)
    cached: frozenset[str] = frozenset()
    counters: Mapping[str, float] = field(default_factory=dict)
    total_ms: float = float("nan")

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages_ms", MappingProxyType(dict(self.stages_ms)))
        object.__setattr__(self, "counters", MappingProxyType(dict(self.counters)))

    @property
    def rtf(self) -> float:
        """Real-time factor: processing time / audio seconds produced (NaN when unknown)."""
        return float(self.counters.get("rtf", float("nan")))

    def with_counter(self, name: str, value: float) -> "StageTimings":
        """A copy with counter ``name`` set to ``value``."""
        return StageTimings(self.stages_ms, self.cached, {**self.counters, name: float(value)}, self.total_ms)

    def as_dict(self) -> dict:
        return {
            "total_ms": round(self.total_ms, 2),
            "stages_ms": {k: round(v, 2) for k, v in self.stages_ms.items()},
            "cached": sorted(self.cached),
            "counters": {k: round(v, 4) for k, v in self.counters.items()},
        }

    def to_header(self) -> str:
        """Compact JSON for the ``X-Timings`` HTTP header."""
        return json.dumps(self.as_dict(), separators=(",", ":"), sort_keys=True)

    def log_line(self, kind: str, request_id: str) -> str:
        stages = ",".join(f"{name}:{ms:.1f}{'(hit)' if name in self.cached else ''}"
                          for name, ms in self.stages_ms.items())
        counters = " ".join(f"{k}={v:.3g}" for k, v in self.counters.items())
        return f"timing {kind} req={request_id} total_ms={self.total_ms:.1f} {counters} stages={stages}".replace("  ", " ")


class Timer:
    """Collects stages for one request; ``finish()`` freezes them into a :class:`StageTimings`.

    Not shared between requests (each request makes its own), so it needs no lock.
    """

    def __init__(self) -> None:
        self._start = time.perf_counter()
        self._stages: dict[str, float] = {}
        self._cached: set[str] = set()
        self._counters: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.record(name, (time.perf_counter() - start) * 1000.0)

    def record(self, name: str, ms: float, cached: bool = False) -> None:
        """Add ``ms`` to stage ``name`` (a stage may run several times, e.g. once per text chunk)."""
        self._stages[name] = self._stages.get(name, 0.0) + ms
        if cached:
            self._cached.add(name)

    def mark_cached(self, *names: str) -> None:
        self._cached.update(names)

    def count(self, name: str, value: float) -> None:
        self._counters[name] = self._counters.get(name, 0.0) + float(value)

    def set_counter(self, name: str, value: float) -> None:
        self._counters[name] = float(value)

    def absorb(self, timings: StageTimings, prefix: str = "") -> None:
        """Fold the stages of a sub-step (e.g. the tokenizer's) into this request's record."""
        for name, ms in timings.stages_ms.items():
            self.record(prefix + name, ms, cached=name in timings.cached)
        for name, value in timings.counters.items():
            self.count(prefix + name, value)

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self._start) * 1000.0

    def finish(self, audio_seconds: float | None = None) -> StageTimings:
        total = self.elapsed_ms()
        if audio_seconds:
            self._counters["audio_s"] = audio_seconds
            self._counters["rtf"] = total / 1000.0 / audio_seconds
        return StageTimings(stages_ms=self._stages, cached=frozenset(self._cached),
                            counters=self._counters, total_ms=total)
