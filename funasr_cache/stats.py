"""Statistics of the prompt cache: this process's counters and the shared ``stats.json``.

Owns: :class:`Counters`, the counts a process made and has not yet merged into ``stats.json``
(hits, misses, puts, evictions, corrupt, coalesced, seconds saved, fills from a prompt source,
per kind); the ``stats.json``
format and its merge (each process adds its own counts under the folder lock, so none overwrites
another's; a ``clear()`` starts a new epoch and counts from the old one are dropped); summing
counters and index sizes into the figures :meth:`funasr_cache.PromptCache.stats` returns.
Does not own: when to flush or the lock (``funasr_cache.store``), what the index holds (``funasr_cache.index``),
atomic writes (``funasr_cache.files``), logging (the caller is told through ``on_unreadable``).
The fields are documented in ``docs/cache.md`` ("Stats file", "Statistics").
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable

from funasr_cache.files import FORMAT, EntryMeta, Key, atomic_write, dump_json

# store_fills: local misses filled from a PromptSource (the voice database) instead of computed.
COUNTERS = ("hits", "misses", "puts", "evictions", "corrupt", "coalesced", "seconds_saved", "store_fills")


def fresh_stats() -> dict:
    """A ``stats.json`` document with no counts and a new epoch."""
    return {"format": FORMAT, "epoch": secrets.token_hex(8), "per_kind": {},
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def load_stats(path: Path) -> dict | None:
    """The ``stats.json`` document at ``path``, or None when it is missing or unreadable."""
    try:
        doc = json.loads(path.read_bytes())
        if isinstance(doc, dict) and isinstance(doc.get("epoch"), str) and isinstance(doc.get("per_kind"), dict) \
                and isinstance(doc.get("since"), str):
            return doc
    except (OSError, ValueError):
        pass
    return None


class Counters:
    """Thread-safe counts of one process, and the ``stats.json`` it last read or wrote (``persisted``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._delta: defaultdict[tuple[str, str], float] = defaultdict(float)
        self.persisted = fresh_stats()
        self.last_flush = time.monotonic()  # when a flush was last tried

    def add(self, kind: str, name: str, amount: float = 1) -> None:
        with self._lock:
            self._delta[(kind, name)] += amount

    def add_lookup(self, kind: str, cost_s: float | None) -> None:
        """Count a hit that saved ``cost_s`` seconds, or a miss (``None``)."""
        with self._lock:
            self._delta[(kind, "misses" if cost_s is None else "hits")] += 1
            if cost_s is not None:
                self._delta[(kind, "seconds_saved")] += cost_s

    def reset(self) -> None:
        """Drop every count and start a new epoch (for ``clear()``)."""
        with self._lock:
            self._delta.clear()
        self.persisted = fresh_stats()

    def save_locked(self, path: Path) -> None:
        """Overwrite ``path`` with ``persisted`` (after :meth:`reset`; folder lock held)."""
        atomic_write(path, dump_json(self.persisted), fsync=False)

    def flush_locked(self, path: Path, on_unreadable: Callable[[], None]) -> None:
        """Merge this process's counts into ``path`` (folder lock held); others' counts are kept.

        ``on_unreadable()`` is called when ``path`` exists but cannot be read (it is then replaced).
        Raises:
            OSError: the file cannot be written; the counts are kept for the next try.
        """
        with self._lock:
            delta, self._delta = self._delta, defaultdict(float)
        try:
            doc = load_stats(path)
            if doc is None:  # missing (first start) or unreadable
                if path.exists():
                    on_unreadable()
                doc = self.persisted
            doc = {**doc, "per_kind": {k: dict(v) for k, v in doc["per_kind"].items()}}
            if doc["epoch"] == self.persisted["epoch"]:  # else a clear() elsewhere reset the counts
                for (kind, name), amount in delta.items():
                    row = doc["per_kind"].setdefault(kind, {})
                    row[name] = row.get(name, 0) + amount
            atomic_write(path, dump_json(doc), fsync=False)
            self.persisted, self.last_flush = doc, time.monotonic()
        except OSError:
            with self._lock:
                for k, v in delta.items():
                    self._delta[k] += v
            raise

    def summary(self, entries: Iterable[tuple[Key, EntryMeta]], shared: dict | None = None) -> tuple[dict, dict]:
        """(totals over all kinds with ``hit_rate``, per-kind rows with ``entries`` and ``bytes``).

        Parameters:
            entries: the index's (key, meta) pairs, for the per-kind sizes.
            shared: a fresher ``stats.json`` document read without the lock; used instead of
                ``persisted`` when it is of the same epoch (it already holds our flushed counts).
        """
        with self._lock:
            base = shared if shared is not None and shared.get("epoch") == self.persisted["epoch"] else self.persisted
            per_kind = {k: dict(v) for k, v in base["per_kind"].items() if isinstance(v, dict)}
            for (kind, name), amount in self._delta.items():
                per_kind.setdefault(kind, {})[name] = per_kind.get(kind, {}).get(name, 0) + amount
        for key, meta in entries:
            row = per_kind.setdefault(key[0].rsplit("-", 1)[0], {})
            row["entries"] = row.get("entries", 0) + 1
            row["bytes"] = row.get("bytes", 0) + meta.nbytes
        for row in per_kind.values():
            for name in COUNTERS + ("entries", "bytes"):
                row[name] = round(row.get(name, 0), 3) if name == "seconds_saved" else int(row.get(name, 0))
        total = {n: sum(r[n] for r in per_kind.values()) for n in COUNTERS}
        looked = total["hits"] + total["misses"]
        return {**total, "seconds_saved": round(total["seconds_saved"], 3),
                "hit_rate": round(total["hits"] / looked, 4) if looked else None}, per_kind
