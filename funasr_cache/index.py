"""Index of the prompt cache's disk entries: the in-memory index, its journal, LRU eviction.

Owns: :class:`DiskIndex`, each process's record of every entry on disk (key, recency, bytes,
sidecar) with the running byte total and an LRU heap; the ``journal`` file that keeps the indexes
of all processes sharing a folder in step (snapshot, appended ``+``/``-`` lines, generations,
compaction); evicting least recently used entries down to the capacity limits. Methods named
``*_locked`` expect the caller to hold the folder lock.
Does not own: the lock itself, statistics, the RAM layer and all logging (``funasr_cache``); the
entry file format, atomic writes and folder scans (``funasr_cache.files``). The journal's format and its
crash guarantees are specified in ``docs/cache.md`` ("Journal").
"""

from __future__ import annotations

import heapq
import os
import re
import secrets
from pathlib import Path
from typing import Callable

from funasr_cache.files import EntryMeta, Key, atomic_write, entry_path, scan_root, unlink_quiet

_JOURNAL_LINE = re.compile(  # "+ folder digest recency_ns nbytes sidecar|-" or "- folder digest"
    r"^([+-]) ([a-z][a-z0-9_]{0,31}-[0-9a-f]{16}) ([0-9a-f]{64})"
    r"(?: ([0-9]{1,20}) ([0-9]{1,15}) ([0-9a-f]{64}\.[0-9a-f]{16}\.safetensors|-))?$", re.M)


def _add_line(key: Key, meta: EntryMeta) -> str:
    return f"+ {key[0]} {key[1]} {meta.recency_ns} {meta.nbytes} {meta.sidecar or '-'}\n"


def _remove_line(key: Key) -> str:
    return f"- {key[0]} {key[1]}\n"


class DiskIndex:
    """Every entry on disk under ``root``, as this process last saw the journal.

    ``entries`` maps (folder, digest) to :class:`EntryMeta`; ``nbytes`` is the sum of their bytes.
    Reading both without the lock is fine for statistics and for recording a hit's recency.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.entries: dict[Key, EntryMeta] = {}
        self.nbytes = 0
        self._heap: list[tuple[int, Key]] = []
        self._jgen, self._jpos, self._jlines, self._jpartial = "", 0, 0, False

    def __len__(self) -> int:
        return len(self.entries)

    # ------------------------------------------------------------------ in memory

    def reset(self, entries: dict[Key, EntryMeta]) -> None:
        """Replace the whole index (no journal line is written)."""
        self.entries, self.nbytes = entries, sum(m.nbytes for m in entries.values())
        self._heap = [(m.recency_ns, k) for k, m in entries.items()]  # must hold every entry
        heapq.heapify(self._heap)

    def set(self, key: Key, meta: EntryMeta) -> None:
        old = self.entries.get(key)
        self.nbytes += meta.nbytes - (old.nbytes if old else 0)
        self.entries[key] = meta
        heapq.heappush(self._heap, (meta.recency_ns, key))

    def drop(self, key: Key) -> None:
        old = self.entries.pop(key, None)
        if old is not None:
            self.nbytes -= old.nbytes

    # ------------------------------------------------------------------ journal (folder lock held)

    def rebuild_locked(self) -> None:
        """Rebuild from a folder scan and publish it as a new journal generation."""
        self.reset(scan_root(self.root))
        self.write_snapshot_locked()

    def write_snapshot_locked(self) -> None:
        """Rewrite the journal as this index under a new generation (others re-read it in full)."""
        gen = secrets.token_hex(8)
        text = f"G {gen}\n" + "".join(_add_line(k, m) for k, m in self.entries.items())
        atomic_write(self.root / "journal", text.encode(), fsync=False)
        self._jgen, self._jpos, self._jlines, self._jpartial = gen, len(text), len(self.entries), False

    def sync_locked(self) -> None:
        """Apply the journal lines other processes appended since we last looked.

        Raises:
            OSError: only from rebuilding after a lost or torn journal (the folders are then the truth).
        """
        try:
            with open(self.root / "journal", "rb") as f:
                head = f.readline()
                gen = head[2:].strip().decode("ascii", "replace") if head.startswith(b"G ") else ""
                if not gen:
                    raise ValueError("journal has no header")
                full = gen != self._jgen  # rewritten by a clear(), a compaction or a new process
                start = f.tell() if full else self._jpos
                f.seek(start)
                data = f.read()
        except (OSError, ValueError):  # journal lost or torn: the folders are the truth
            self.rebuild_locked()
            return
        end = data.rfind(b"\n") + 1
        lines = _JOURNAL_LINE.findall(data[:end].decode("ascii", "replace"))
        # Lines that do not match (torn by a killed writer) are skipped; the next start-up scan corrects the index.
        if full:  # rebuild in one go: no heap pushes or byte sums per line
            entries: dict[Key, EntryMeta] = {}
            for op, folder, digest, recency, nbytes, side in lines:
                if op == "-":
                    entries.pop((folder, digest), None)
                elif recency:
                    entries[(folder, digest)] = EntryMeta(int(recency), int(nbytes), None if side == "-" else side)
            self.reset(entries)
            self._jlines = 0
        else:
            for op, folder, digest, recency, nbytes, side in lines:
                if op == "-":
                    self.drop((folder, digest))
                elif recency:
                    self.set((folder, digest), EntryMeta(int(recency), int(nbytes), None if side == "-" else side))
        self._jgen, self._jpos, self._jpartial = gen, start + end, end < len(data)
        self._jlines += data.count(b"\n", 0, end)

    def add_locked(self, key: Key, meta: EntryMeta) -> None:
        """Record a new or replaced entry, in memory and in the journal."""
        self.set(key, meta)
        self._append_locked([_add_line(key, meta)])

    def remove_locked(self, key: Key) -> None:
        """Record a removed entry, in memory and in the journal."""
        self.drop(key)
        self._append_locked([_remove_line(key)])

    def _append_locked(self, lines: list[str]) -> None:
        data = ("\n" if self._jpartial else "") + "".join(lines)
        with open(self.root / "journal", "ab") as f:
            f.write(data.encode())
            self._jpos = f.tell()
        self._jpartial, self._jlines = False, self._jlines + len(lines)
        if self._jlines > 2 * len(self.entries) + 1000:
            self.write_snapshot_locked()

    # ------------------------------------------------------------------ eviction (folder lock held)

    def evict_locked(self, max_entries: int, max_bytes: int, on_evict: Callable[[str], None]) -> None:
        """Delete least recently used entries until both limits hold; ``on_evict(kind)`` per file deleted.

        Recency is re-checked against the file's mtime first, so a hit in another process saves it.
        """
        lines = []
        while self.entries and (len(self.entries) > max_entries or self.nbytes > max_bytes):
            if not self._heap or len(self._heap) > 3 * len(self.entries) + 1024:  # mostly stale items: start afresh
                self.reset(self.entries)
            recency, key = heapq.heappop(self._heap)
            meta = self.entries.get(key)
            if meta is None:
                continue
            if meta.recency_ns > recency:  # hit since it was queued
                heapq.heappush(self._heap, (meta.recency_ns, key))
                continue
            path = entry_path(self.root, *key)
            try:
                mtime = os.stat(path).st_mtime_ns
            except FileNotFoundError:
                mtime = None
            if mtime is not None and mtime > recency:  # hit in another process
                meta.recency_ns = mtime
                heapq.heappush(self._heap, (mtime, key))
                continue
            if mtime is not None:
                unlink_quiet(path)  # JSON first: once it is gone the entry is invisible
                if meta.sidecar:
                    unlink_quiet(os.path.join(os.path.dirname(path), meta.sidecar))
                on_evict(key[0].rsplit("-", 1)[0])
            self.drop(key)
            lines.append(_remove_line(key))
        if lines:
            self._append_locked(lines)
