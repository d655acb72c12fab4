"""Persistent prompt cache: content-addressed, sharded JSON files, an LRU index and a RAM layer.

Owns: keeping the results of expensive per-clip work (FunASR tokens, decoder prompt features, ...)
on disk and in RAM under the key ``kind`` + ``namespace`` + ``digest``; capacity (entries and
bytes), LRU eviction, statistics and the ``check()`` audit.
Does not own: what a namespace means (callers pass model identity + preprocessing version, see
:func:`make_namespace`), what a payload holds, which models exist. ``docs/cache.md`` is the
long-form contract.

Layout (``nshash`` = 16 hex of BLAKE2b over kind and namespace, so no caller string is a path)::

    <root>/<kind>-<nshash>/namespace.json                 the namespace in clear, for people
    <root>/<kind>-<nshash>/<hh>/<digest>.json             one entry; hh = digest[:2], 256 shards
    <root>/<kind>-<nshash>/<hh>/<digest>.<tok>.safetensors   its arrays, if any (tok is random)
    <root>/.lock, journal, stats.json                     process lock, index journal, counters

Guarantees
    * No partial reads: each file is written to a temp file in its own folder, fsynced and
      published with ``os.replace``; the sidecar goes first and the JSON last, so the JSON is the
      commit point and never names a missing or half-written sidecar.
    * Thread- and process-safe: publishing, eviction, clear and the stats file are serialised by
      one ``filelock`` lock per folder; reads take no lock. Processes may share a folder.
    * A corrupt, truncated, empty or wrong-shape entry is a miss, is logged at WARNING once and is
      deleted. Unknown fields are ignored, so newer writers may add some.
    * Capacity: after each write, entries <= max_entries and entry bytes (JSON + sidecar) <=
      max_bytes over all processes; least recently used entries go first. Recency is the JSON's
      mtime, set on every hit, so the order survives restarts. The index is rebuilt from folder
      metadata at start-up and kept in step between processes by an append-only journal.
    * The RAM layer serves an entry only while its file exists, so an eviction or ``clear()`` in
      another process is seen at once.
    * Concurrent misses for one key in one process compute once (``get_or_compute``).
Non-guarantees
    * Network filesystems; clock skew between writers (recency is wall-clock time); durability
      across power loss (folders are not fsynced, so an entry may vanish: a miss); forking a live
      instance (create it after forking). A writer killed mid-eviction may leave an orphan sidecar
      that is uncounted until the next start-up scan removes it.
    * ``bytes`` counts entry files only: not folders, ``namespace.json``, the journal or stats.
Failures
    * I/O errors on read are logged and become misses. A write that meets a read-only or full disk
      (any ``OSError``) switches to memory-only caching with one WARNING and retries the disk after
      a minute; the request is still served. A lock busy for 10 s skips the disk write.
    * Malformed kinds, digests or payloads raise :class:`errors.CacheError` (a caller bug).
"""

from __future__ import annotations

import atexit
import hashlib
import heapq
import json
import logging
import math
import os
import re
import secrets
import shutil
import threading
import time
import weakref
from collections import OrderedDict, defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np
import safetensors.numpy
from filelock import FileLock, Timeout
from safetensors import SafetensorError

from errors import CacheError

log = logging.getLogger(__name__)

FORMAT = 1  # written into every JSON file; readers ignore fields they do not know
_KIND = re.compile(r"[a-z][a-z0-9_]{0,31}")
_DIGEST = re.compile(r"[0-9a-f]{64}")
_FOLDER = re.compile(r"[a-z][a-z0-9_]{0,31}-[0-9a-f]{16}")
_SHARD = re.compile(r"[0-9a-f]{2}")
_SIDECAR = re.compile(r"([0-9a-f]{64})\.[0-9a-f]{16}\.safetensors")
_JOURNAL_LINE = re.compile(  # "+ folder digest recency_ns nbytes sidecar|-" or "- folder digest"
    r"^([+-]) ([a-z][a-z0-9_]{0,31}-[0-9a-f]{16}) ([0-9a-f]{64})"
    r"(?: ([0-9]{1,20}) ([0-9]{1,15}) ([0-9a-f]{64}\.[0-9a-f]{16}\.safetensors|-))?$", re.M)
_LOCK_TIMEOUT_S = 10.0
_GRACE_S = 120.0  # temp files and unnamed sidecars younger than this may belong to a live writer
_RETRY_DISK_S = 60.0
_FLUSH_EVERY_S = 2.0  # hits reach stats.json at most this late (puts flush at once)
_COUNTERS = ("hits", "misses", "puts", "evictions", "corrupt", "coalesced", "seconds_saved")


@dataclass(frozen=True)
class CacheEntry:
    """One cached value. ``payload`` went through JSON (lists, not tuples or numpy); arrays are
    read-only. Both are shared with other callers: do not mutate."""

    kind: str
    namespace: str
    digest: str
    payload: Mapping
    arrays: Mapping[str, np.ndarray] = field(default_factory=dict)
    cost_s: float = 0.0
    created_at: float = 0.0


def audio_digest(samples: np.ndarray, sample_rate: int) -> str:
    """The cache key of a clip: SHA-256 (64 hex) over float32 little-endian samples, rate and shape.

    Hash the *decoded, preprocessed* samples so that any file name or container that decodes to
    the same samples gives the same key. SHA-256 was faster than BLAKE2b on the x86 CPUs we measured
    (SHA-NI; see docs/perf/cache.md); the choice is fixed because keys must agree across machines.

    Parameters:
        samples: ``[N]`` mono audio (any float dtype; converted to float32 without a copy when it
            already is contiguous float32).
        sample_rate: Hz, > 0.
    Raises:
        CacheError: sample_rate is not positive.
    """
    if int(sample_rate) <= 0:
        raise CacheError(f"sample_rate must be positive, got {sample_rate!r}")
    array = np.ascontiguousarray(samples, dtype="<f4")
    h = hashlib.sha256(f"f32le;{int(sample_rate)};{array.shape}".encode())
    h.update(memoryview(array).cast("B"))
    return h.hexdigest()


def fingerprint_files(paths: Iterable[Path | str]) -> str:
    """16 hex from each file's name, size and mtime (ns); reads no contents. A missing file
    counts as "missing", so creating it later changes the fingerprint."""
    h = hashlib.blake2b(digest_size=8)
    for p in sorted(Path(x) for x in paths):
        try:
            st = p.stat()
            h.update(f"{p.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except FileNotFoundError:
            h.update(f"{p.name}|missing\n".encode())
    return h.hexdigest()


def make_namespace(model: str, fingerprint: str, version: int | str) -> str:
    """``model@fingerprint/vversion``: everything besides the clip that determines a value."""
    return f"{model}@{fingerprint}/v{version}"


Compute = Callable[[], "tuple[Mapping, Mapping[str, np.ndarray] | None]"]


class _Meta:
    """Index record of one entry on disk."""

    __slots__ = ("recency_ns", "nbytes", "sidecar")

    def __init__(self, recency_ns: int, nbytes: int, sidecar: str | None) -> None:
        self.recency_ns, self.nbytes, self.sidecar = recency_ns, nbytes, sidecar


class _Flight:
    __slots__ = ("done", "entry", "error")

    def __init__(self) -> None:
        self.done, self.entry, self.error = threading.Event(), None, None


class _Lost(Exception):
    """A concurrent clear() removed the folder an entry was being published into."""


class _SidecarGone(Exception):
    """The JSON names a sidecar that is not there (a writer may have just replaced the entry)."""


class PromptCache:
    """Disk + RAM cache of prompt work; see the module docstring for the contract.

    Parameters:
        root: the cache folder (created if missing).
        max_entries, max_bytes: disk capacity (>= 1 each); entry files only.
        memory_entries: hot entries kept in RAM (0 disables the RAM layer).
    """

    def __init__(self, root: Path | str, max_entries: int = 20000, max_bytes: int = 2 * 1024**3,
                 memory_entries: int = 256) -> None:
        if max_entries < 1 or max_bytes < 1 or memory_entries < 0:
            raise ValueError(f"bad cache limits: max_entries={max_entries}, max_bytes={max_bytes}, "
                             f"memory_entries={memory_entries}")
        self.root = Path(root)
        self.max_entries, self.max_bytes, self.memory_entries = int(max_entries), int(max_bytes), int(memory_entries)
        self._mem: OrderedDict[tuple[str, str, str], tuple[CacheEntry, bool]] = OrderedDict()
        self._mlock = threading.Lock()  # RAM layer, counters, flights: the hit path's only lock
        self._dlock = threading.RLock()  # this process's share of the folder lock
        self._flock: FileLock | None = None
        self._index: dict[tuple[str, str], _Meta] = {}
        self._bytes = 0
        self._heap: list[tuple[int, tuple[str, str]]] = []
        self._jgen, self._jpos, self._jlines, self._jpartial = "", 0, 0, False
        self._folders: dict[tuple[str, str], str] = {}
        self._made: set[str] = set()
        self._flights: dict[tuple[str, str, str], _Flight] = {}
        self._delta: defaultdict[tuple[str, str], float] = defaultdict(float)
        self._persisted = _fresh_stats()
        self._warned: set = set()
        self._degraded, self._retry_at = "", 0.0
        self._last_flush = time.monotonic()
        self._open()
        atexit.register(_flush_at_exit, weakref.ref(self))

    @classmethod
    def from_settings(cls, settings) -> "PromptCache":
        return cls(settings.cache_dir, settings.cache_max_entries, settings.cache_max_bytes,
                   settings.cache_memory_entries)

    # ------------------------------------------------------------------ public API

    def get(self, kind: str, namespace: str, digest: str) -> CacheEntry | None:
        """The entry, or None (a miss; also for unreadable or corrupt files).

        Raises:
            CacheError: kind, namespace or digest is malformed.
        """
        folder = self._folder(kind, namespace, digest)
        entry = self._lookup(kind, namespace, digest, folder)
        with self._mlock:
            self._delta[(kind, "hits" if entry else "misses")] += 1
            if entry:
                self._delta[(kind, "seconds_saved")] += entry.cost_s
        if time.monotonic() - self._last_flush > _FLUSH_EVERY_S:
            self._try_flush(timeout=0)
        return entry

    def put(self, kind: str, namespace: str, digest: str, payload: Mapping, cost_s: float,
            arrays: Mapping[str, np.ndarray] | None = None) -> CacheEntry:
        """Store (or replace) an entry and return it as a reader will see it.

        Parameters:
            payload: JSON-able mapping (numpy scalars/arrays become numbers/lists).
            cost_s: measured seconds it took to compute (feeds "seconds saved").
            arrays: name -> numeric array, stored in a safetensors sidecar.
        Raises:
            CacheError: malformed key, payload not JSON-able, negative/NaN cost, bad array.
        """
        folder = self._folder(kind, namespace, digest)
        entry, text, blob, sidecar = _encode(kind, namespace, digest, payload, cost_s, arrays)
        with self._mlock:
            self._delta[(kind, "puts")] += 1
        on_disk = self._disk_ok() and self._publish(folder, entry, text, blob, sidecar)
        self._remember(entry, on_disk)
        return entry

    def get_or_compute(self, kind: str, namespace: str, digest: str, compute: Compute) -> tuple[CacheEntry, bool]:
        """``(entry, hit)``. On a miss ``compute()`` -> ``(payload, arrays or None)`` runs once per
        key in this process (concurrent callers wait and share it, with hit=False); its wall time
        is stored as ``cost_s``.

        Raises:
            CacheError: malformed key, or ``compute`` returned something other than a pair.
            Whatever ``compute`` raises, in every caller waiting for it; nothing is stored then.
        """
        entry = self.get(kind, namespace, digest)
        if entry is not None:
            return entry, True
        mkey = (kind, namespace, digest)
        with self._mlock:
            flight = self._flights.get(mkey)
            leader = flight is None
            if leader:
                flight = self._flights[mkey] = _Flight()
        if not leader:
            flight.done.wait()
            with self._mlock:
                self._delta[(kind, "coalesced")] += 1
            if flight.error is not None:
                raise flight.error
            return flight.entry, False
        try:
            flight.entry = self._lookup(kind, namespace, digest, self._folder(kind, namespace, digest))
            if flight.entry is None:  # nobody finished it between our miss and our leadership
                start = time.perf_counter()
                result = compute()
                cost = time.perf_counter() - start
                if not (isinstance(result, (tuple, list)) and len(result) == 2):
                    raise CacheError(f"compute() for kind {kind!r} must return (payload, arrays), got {type(result).__name__}")
                flight.entry = self.put(kind, namespace, digest, result[0], cost, result[1])
            return flight.entry, False
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            with self._mlock:
                self._flights.pop(mkey, None)
            flight.done.set()

    def stats(self) -> dict:
        """JSON-able counters since the last ``clear()`` (all processes), plus current sizes."""
        if self._disk_ok():
            self._try_flush(timeout=_LOCK_TIMEOUT_S)
        with self._mlock:
            per_kind = {k: dict(v) for k, v in self._persisted["per_kind"].items()}
            for (kind, name), amount in self._delta.items():
                per_kind.setdefault(kind, {})[name] = per_kind.get(kind, {}).get(name, 0) + amount
            mem = len(self._mem)
        for key, meta in list(self._index.items()):
            row = per_kind.setdefault(key[0].rsplit("-", 1)[0], {})
            row["entries"] = row.get("entries", 0) + 1
            row["bytes"] = row.get("bytes", 0) + meta.nbytes
        for row in per_kind.values():
            for name in _COUNTERS + ("entries", "bytes"):
                row[name] = round(row.get(name, 0), 3) if name == "seconds_saved" else int(row.get(name, 0))
        total = {n: sum(r[n] for r in per_kind.values()) for n in _COUNTERS}
        looked = total["hits"] + total["misses"]
        return {**total, "seconds_saved": round(total["seconds_saved"], 3),
                "hit_rate": round(total["hits"] / looked, 4) if looked else None,
                "entries": len(self._index), "bytes": self._bytes, "max_entries": self.max_entries,
                "max_bytes": self.max_bytes, "memory_entries": mem, "memory_capacity": self.memory_entries,
                "since": self._persisted["since"], "degraded": bool(self._degraded),
                "degraded_reason": self._degraded, "root": str(self.root), "per_kind": per_kind}

    def clear(self) -> None:
        """Remove every entry (all processes see it) and reset the statistics."""
        with self._mlock:
            self._mem.clear()
            self._delta.clear()
        self._persisted = _fresh_stats()
        trash = []
        if self._flock is None:  # the folder never opened: RAM was all there was
            return
        try:
            with self._locked():
                for item in os.scandir(self.root):
                    if _FOLDER.fullmatch(item.name) and item.is_dir(follow_symlinks=False):
                        trash.append(self.root / f".trash-{secrets.token_hex(8)}")
                        os.rename(item.path, trash[-1])  # readers see the folder vanish at once
                self._index, self._bytes, self._heap = {}, 0, []
                self._made.clear()
                self._write_snapshot_locked()
                _atomic_write(self.root / "stats.json", _dump(self._persisted), fsync=False)
        except (OSError, Timeout) as exc:
            log.warning("prompt cache: clear() could not empty %s (%s)", self.root, exc)
        for folder in trash:  # outside the lock: other processes ignore .trash-* folders
            shutil.rmtree(folder, ignore_errors=True)

    def __len__(self) -> int:
        """Entries on disk (or in RAM while memory-only)."""
        if self._degraded:
            return len(self._mem)
        try:
            with self._locked():
                self._sync_locked()
        except (OSError, Timeout):
            pass
        return len(self._index)

    def close(self) -> None:
        """Write pending counters to disk (also done at interpreter exit)."""
        self._try_flush(timeout=1.0)

    def check(self) -> list[str]:
        """Audit the folder against the contract (reads every file); returns problems, [] if none."""
        problems = [f"memory-only: {self._degraded}"] if self._degraded else []
        try:
            with self._locked():
                self._sync_locked()
                problems += self._audit_locked()
        except (OSError, Timeout) as exc:
            problems.append(f"cannot audit {self.root}: {exc}")
        return problems

    # ------------------------------------------------------------------ reading

    def _folder(self, kind: str, namespace: str, digest: str) -> str:
        if not isinstance(kind, str) or not _KIND.fullmatch(kind):
            raise CacheError(f"cache kind must match [a-z][a-z0-9_]{{0,31}}, got {kind!r:.80}")
        if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
            raise CacheError(f"cache digest must be 64 lowercase hex characters (audio_digest), got {digest!r:.80}")
        if not isinstance(namespace, str) or not namespace:
            raise CacheError(f"cache namespace must be a non-empty string, got {namespace!r:.80}")
        folder = self._folders.get((kind, namespace))
        if folder is None:
            nshash = hashlib.blake2b(f"{kind}\n{namespace}".encode(), digest_size=8).hexdigest()
            folder = self._folders[(kind, namespace)] = f"{kind}-{nshash}"
        return folder

    def _path(self, folder: str, digest: str) -> str:
        return os.path.join(self.root, folder, digest[:2], digest + ".json")

    def _lookup(self, kind: str, namespace: str, digest: str, folder: str) -> CacheEntry | None:
        mkey, path = (kind, namespace, digest), self._path(folder, digest)
        with self._mlock:
            item = self._mem.get(mkey)
            if item is not None:
                self._mem.move_to_end(mkey)
        if item is not None:
            if not item[1] or self._touch(path, folder, digest):
                return item[0]
            with self._mlock:  # evicted or cleared by another process
                self._mem.pop(mkey, None)
        entry = self._read(path, kind, namespace, digest, folder)
        if entry is not None:
            self._touch(path, folder, digest)
            self._remember(entry, True)
        return entry

    def _touch(self, path: str, folder: str, digest: str) -> bool:
        """Record a hit as the file's mtime; False when the file is gone."""
        now = time.time_ns()
        try:
            os.utime(path, ns=(now, now))
        except FileNotFoundError:
            return False
        except OSError:
            return True  # read-only disk: the entry is valid, only its recency is not kept
        meta = self._index.get((folder, digest))
        if meta is not None:
            meta.recency_ns = now
        return True

    def _read(self, path: str, kind: str, namespace: str, digest: str, folder: str) -> CacheEntry | None:
        for attempt in range(2):
            try:
                with open(path, "rb") as f:
                    ino = os.fstat(f.fileno()).st_ino
                    raw = f.read()
                return _decode(raw, kind, namespace, digest, os.path.dirname(path))
            except (FileNotFoundError, NotADirectoryError):
                return None
            except _SidecarGone:
                if attempt == 0:
                    continue  # a writer replaced or evicted the entry while we read it
                reason = "its sidecar file is missing"
            except (ValueError, TypeError, KeyError, SafetensorError) as exc:
                reason = f"{type(exc).__name__}: {exc}"[:200]
            except OSError as exc:
                self._warn_once("read", "prompt cache: cannot read %s (%s); treating it and later such "
                                "failures as misses", path, exc)
                return None
            self._discard_corrupt(path, ino, kind, folder, digest, reason)
            return None
        return None

    def _discard_corrupt(self, path: str, ino: int, kind: str, folder: str, digest: str, reason: str) -> None:
        try:
            with self._locked(timeout=1.0):
                st = os.stat(path)
                if st.st_ino != ino:
                    return  # replaced by a writer since we read it
                self._sync_locked()
                meta = self._index.get((folder, digest))
                side = _named_sidecar(path) or (meta.sidecar if meta else None)
                _unlink(path)
                if side:
                    _unlink(os.path.join(os.path.dirname(path), side))
                if meta is not None:
                    self._drop((folder, digest))
                    self._append_locked([f"- {folder} {digest}\n"])
        except FileNotFoundError:
            return  # evicted meanwhile: not corrupt
        except (OSError, Timeout):
            pass  # read-only disk: leave the file, but still warn once
        if (path, ino) not in self._warned:
            self._warned.add((path, ino))
            log.warning("prompt cache: corrupt entry %s (%s); deleted, treated as a miss", path, reason)
            with self._mlock:
                self._delta[(kind, "corrupt")] += 1

    def _remember(self, entry: CacheEntry, on_disk: bool) -> None:
        if self.memory_entries <= 0:
            return
        mkey = (entry.kind, entry.namespace, entry.digest)
        with self._mlock:
            self._mem[mkey] = (entry, on_disk)
            self._mem.move_to_end(mkey)
            while len(self._mem) > self.memory_entries:
                self._mem.popitem(last=False)

    # ------------------------------------------------------------------ writing

    def _publish(self, folder: str, entry: CacheEntry, text: bytes, blob: bytes, sidecar: str | None) -> bool:
        """Write the entry's files and commit it; False when it stays in RAM only."""
        for _ in range(2):
            try:
                return self._publish_once(folder, entry, text, blob, sidecar)
            except _Lost:
                self._made.discard(folder)  # a concurrent clear() removed the folder: make it again
                continue
            except Timeout:
                self._warn_once("lock", "prompt cache: lock %s busy for %.0f s; entry kept in memory only",
                                self.root / ".lock", _LOCK_TIMEOUT_S)
            except OSError as exc:
                self._degrade(exc)
            return False
        return False

    def _publish_once(self, folder: str, entry: CacheEntry, text: bytes, blob: bytes, sidecar: str | None) -> bool:
        shard = os.path.join(self.root, folder, entry.digest[:2])
        path, key = os.path.join(shard, entry.digest + ".json"), (folder, entry.digest)
        tmp = side_path = None
        try:
            self._ensure_folder(folder, entry.kind, entry.namespace)
            try:
                os.mkdir(shard)  # not makedirs: a folder a clear() just removed must not come back bare
            except FileExistsError:
                pass
            if sidecar:
                side_path = os.path.join(shard, sidecar)
                _atomic_write(side_path, blob)
            tmp = _write_temp(shard, text)
            with self._locked():
                self._sync_locked()
                if side_path and not os.path.exists(side_path):
                    raise _Lost
                old_side = _named_sidecar(path)
                now = time.time_ns()
                os.utime(tmp, ns=(now, now))
                # Journal first: a writer killed before the rename leaves an over-count, never an under-count.
                self._set(key, _Meta(now, len(text) + len(blob), sidecar))
                self._append_locked([_add_line(key, self._index[key])])
                try:
                    os.replace(tmp, path)
                except OSError:
                    self._drop(key)
                    self._append_locked([f"- {folder} {entry.digest}\n"])
                    raise
                tmp = side_path = None
                if old_side and old_side != sidecar:
                    _unlink(os.path.join(shard, old_side))
                self._evict_locked()
                self._flush_locked()
        except FileNotFoundError:
            raise _Lost from None
        finally:
            for leftover in (tmp, side_path):
                if leftover:
                    _unlink(leftover)
        if self._degraded:
            log.info("prompt cache: %s is writable again; leaving memory-only mode", self.root)
            self._degraded = ""
        return key in self._index

    def _ensure_folder(self, folder: str, kind: str, namespace: str) -> None:
        if folder in self._made:
            return
        path = self.root / folder
        path.mkdir(parents=True, exist_ok=True)
        if not (path / "namespace.json").exists():
            _atomic_write(path / "namespace.json", _dump({"kind": kind, "namespace": namespace}))
        self._made.add(folder)

    def _evict_locked(self) -> None:
        lines = []
        while self._index and (len(self._index) > self.max_entries or self._bytes > self.max_bytes):
            if not self._heap or len(self._heap) > 3 * len(self._index) + 1024:  # mostly stale items: start afresh
                self._reset_index(self._index)
            recency, key = heapq.heappop(self._heap)
            meta = self._index.get(key)
            if meta is None:
                continue
            if meta.recency_ns > recency:  # hit since it was queued
                heapq.heappush(self._heap, (meta.recency_ns, key))
                continue
            path = self._path(*key)
            try:
                mtime = os.stat(path).st_mtime_ns
            except FileNotFoundError:
                mtime = None
            if mtime is not None and mtime > recency:  # hit in another process
                meta.recency_ns = mtime
                heapq.heappush(self._heap, (mtime, key))
                continue
            if mtime is not None:
                _unlink(path)  # JSON first: once it is gone the entry is invisible
                if meta.sidecar:
                    _unlink(os.path.join(os.path.dirname(path), meta.sidecar))
                with self._mlock:
                    self._delta[(key[0].rsplit("-", 1)[0], "evictions")] += 1
            self._drop(key)
            lines.append(f"- {key[0]} {key[1]}\n")
        if lines:
            self._append_locked(lines)

    # ------------------------------------------------------------------ index and journal

    def _open(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._flock = FileLock(str(self.root / ".lock"), timeout=_LOCK_TIMEOUT_S, thread_local=False)
            with self._locked():
                self._reset_index(self._scan())
                self._write_snapshot_locked()
                self._evict_locked()
                self._flush_locked()
            self._degraded = ""
        except (OSError, Timeout) as exc:
            self._degrade(exc)

    def _scan(self) -> dict[tuple[str, str], _Meta]:
        """The index from folder metadata (stat only; no entry is opened unless two sidecars compete)."""
        shards = []
        for top in os.scandir(self.root):
            if top.name.startswith(".trash-"):
                shutil.rmtree(top.path, ignore_errors=True)  # left by a clear() that was killed
            elif _FOLDER.fullmatch(top.name) and top.is_dir(follow_symlinks=False):
                shards += [(top.name, s.path) for s in os.scandir(top.path)
                           if _SHARD.fullmatch(s.name) and s.is_dir(follow_symlinks=False)]
        old = time.time() - _GRACE_S
        return {key: meta for folder, shard in shards for key, meta in _scan_shard(folder, shard, old)}

    def _reset_index(self, index: dict[tuple[str, str], _Meta]) -> None:
        self._index, self._bytes = index, sum(m.nbytes for m in index.values())
        self._heap = [(m.recency_ns, k) for k, m in index.items()]  # must hold every entry
        heapq.heapify(self._heap)

    def _set(self, key: tuple[str, str], meta: _Meta) -> None:
        old = self._index.get(key)
        self._bytes += meta.nbytes - (old.nbytes if old else 0)
        self._index[key] = meta
        heapq.heappush(self._heap, (meta.recency_ns, key))

    def _drop(self, key: tuple[str, str]) -> None:
        old = self._index.pop(key, None)
        if old is not None:
            self._bytes -= old.nbytes

    def _write_snapshot_locked(self) -> None:
        gen = secrets.token_hex(8)
        text = f"G {gen}\n" + "".join(_add_line(k, m) for k, m in self._index.items())
        _atomic_write(self.root / "journal", text.encode(), fsync=False)
        self._jgen, self._jpos, self._jlines, self._jpartial = gen, len(text), len(self._index), False

    def _sync_locked(self) -> None:
        """Apply the journal lines other processes appended since we last looked."""
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
            self._reset_index(self._scan())
            self._write_snapshot_locked()
            return
        end = data.rfind(b"\n") + 1
        lines = _JOURNAL_LINE.findall(data[:end].decode("ascii", "replace"))
        # Lines that do not match (torn by a killed writer) are skipped; the next start-up scan corrects the index.
        if full:  # rebuild in one go: no heap pushes or byte sums per line
            index: dict[tuple[str, str], _Meta] = {}
            for op, folder, digest, recency, nbytes, side in lines:
                if op == "-":
                    index.pop((folder, digest), None)
                elif recency:
                    index[(folder, digest)] = _Meta(int(recency), int(nbytes), None if side == "-" else side)
            self._reset_index(index)
            self._jlines = 0
        else:
            for op, folder, digest, recency, nbytes, side in lines:
                if op == "-":
                    self._drop((folder, digest))
                elif recency:
                    self._set((folder, digest), _Meta(int(recency), int(nbytes), None if side == "-" else side))
        self._jgen, self._jpos, self._jpartial = gen, start + end, end < len(data)
        self._jlines += data.count(b"\n", 0, end)

    def _append_locked(self, lines: list[str]) -> None:
        data = ("\n" if self._jpartial else "") + "".join(lines)
        with open(self.root / "journal", "ab") as f:
            f.write(data.encode())
            self._jpos = f.tell()
        self._jpartial, self._jlines = False, self._jlines + len(lines)
        if self._jlines > 2 * len(self._index) + 1000:
            self._write_snapshot_locked()

    # ------------------------------------------------------------------ locking, stats, faults

    @contextmanager
    def _locked(self, timeout: float = _LOCK_TIMEOUT_S) -> Iterator[None]:
        if self._flock is None:
            raise OSError(f"cache folder {self.root} is unavailable")
        if not (self._dlock.acquire(blocking=False) if timeout <= 0 else self._dlock.acquire(timeout=timeout)):
            raise Timeout(str(self.root / ".lock"))
        try:
            with self._flock.acquire(timeout=timeout):
                yield
        finally:
            self._dlock.release()

    def _flush_locked(self) -> None:
        """Merge this process's counters into stats.json (others' counts are kept, not overwritten)."""
        with self._mlock:
            delta, self._delta = self._delta, defaultdict(float)
        try:
            doc = _load_stats(self.root / "stats.json")
            if doc is None:  # missing (first start) or unreadable
                if (self.root / "stats.json").exists():
                    self._warn_once("stats", "prompt cache: %s is unreadable; counting from zero",
                                    self.root / "stats.json")
                doc = self._persisted
            doc = {**doc, "per_kind": {k: dict(v) for k, v in doc["per_kind"].items()}}
            if doc["epoch"] == self._persisted["epoch"]:  # else a clear() elsewhere reset the counts
                for (kind, name), amount in delta.items():
                    row = doc["per_kind"].setdefault(kind, {})
                    row[name] = row.get(name, 0) + amount
            _atomic_write(self.root / "stats.json", _dump(doc), fsync=False)
            self._persisted, self._last_flush = doc, time.monotonic()
        except OSError:
            with self._mlock:
                for k, v in delta.items():
                    self._delta[k] += v
            raise

    def _try_flush(self, timeout: float) -> None:
        self._last_flush = time.monotonic()
        try:
            with self._locked(timeout=timeout):
                self._sync_locked()
                self._flush_locked()
        except (OSError, Timeout):
            pass

    def _disk_ok(self) -> bool:
        if not self._degraded:
            return True
        if time.monotonic() < self._retry_at:
            return False
        if self._flock is None:
            self._open()
        return self._flock is not None

    def _degrade(self, exc: BaseException) -> None:
        self._retry_at = time.monotonic() + _RETRY_DISK_S
        if not self._degraded:
            log.warning("prompt cache: cannot write %s (%s); caching in memory only, retrying the disk every %.0f s",
                        self.root, exc, _RETRY_DISK_S)
        self._degraded = f"{type(exc).__name__}: {exc}"

    def _warn_once(self, key, msg: str, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)

    def _audit_locked(self) -> list[str]:
        problems, seen, old = [], set(), time.time() - _GRACE_S
        for top in os.scandir(self.root):
            if not _FOLDER.fullmatch(top.name):
                if top.name not in (".lock", "journal", "stats.json") and not top.name.startswith(".trash-"):
                    problems.append(f"unexpected item {top.path}")
                continue
            try:
                ns = json.loads(Path(top.path, "namespace.json").read_bytes())
                kind, namespace = ns["kind"], ns["namespace"]
                if self._folder(kind, namespace, "0" * 64) != top.name:
                    raise ValueError("does not hash to its folder name")
            except (OSError, ValueError, KeyError, TypeError, CacheError) as exc:
                problems.append(f"{top.path}/namespace.json is missing or wrong ({exc})")
                continue
            for dirpath, _, names in os.walk(top.path):
                named = set()
                for name in names:
                    path = os.path.join(dirpath, name)
                    if name.endswith(".json") and _DIGEST.fullmatch(name[:-5]):
                        seen.add((top.name, name[:-5]))
                        named.add(_named_sidecar(path))
                        try:
                            _decode(Path(path).read_bytes(), kind, namespace, name[:-5], dirpath)
                        except (_SidecarGone, ValueError, TypeError, KeyError, SafetensorError, OSError) as exc:
                            problems.append(f"{path}: unreadable entry ({type(exc).__name__} {exc})")
                for name in names:
                    path = os.path.join(dirpath, name)
                    stale = os.path.getmtime(path) < old
                    if _SIDECAR.fullmatch(name) and name not in named and stale:
                        problems.append(f"{path}: sidecar no entry names")
                    elif name.endswith(".tmp") and stale:
                        problems.append(f"{path}: leftover temp file")
        for key in seen ^ set(self._index):
            problems.append(f"index and disk disagree on {key[0]}/{key[1]}")
        if len(self._index) > self.max_entries or self._bytes > self.max_bytes:
            problems.append(f"over capacity: {len(self._index)} entries, {self._bytes} bytes")
        if (self.root / "stats.json").exists() and _load_stats(self.root / "stats.json") is None:
            problems.append("stats.json is unreadable")
        return problems


# ---------------------------------------------------------------------- file and JSON helpers

def _scan_shard(folder: str, shard: str, old: float) -> list[tuple[tuple[str, str], _Meta]]:
    """Index records of one shard folder; removes temp files and orphan sidecars older than ``old``."""
    jsons, sides = {}, defaultdict(list)
    for item in os.scandir(shard):
        name = item.name
        try:
            if name.endswith(".json") and _DIGEST.fullmatch(name[:-5]):
                jsons[name[:-5]] = item.stat(follow_symlinks=False)
            elif m := _SIDECAR.fullmatch(name):
                sides[m.group(1)].append((name, item.stat(follow_symlinks=False)))
            elif name.endswith(".tmp") and item.stat(follow_symlinks=False).st_mtime < old:
                _unlink(item.path)  # from a writer that died
        except FileNotFoundError:
            continue
    records = []
    for digest, st in jsons.items():
        found, named, extra = sides.pop(digest, []), None, 0
        if len(found) == 1:  # the usual case: the one sidecar is the entry's
            named = found[0][0]
        elif found:  # a writer died mid-replace: ask the entry which one it names
            named = _named_sidecar(os.path.join(shard, digest + ".json"))
        for name, sst in found:
            if name == named:
                extra = sst.st_size
            elif sst.st_mtime < old:
                _unlink(os.path.join(shard, name))
        records.append(((folder, digest), _Meta(st.st_mtime_ns, st.st_size + extra, named)))
    for found in sides.values():  # sidecars of entries that were never committed
        for name, sst in found:
            if sst.st_mtime < old:
                _unlink(os.path.join(shard, name))
    return records


def _encode(kind: str, namespace: str, digest: str, payload: Mapping, cost_s: float,
            arrays: Mapping[str, np.ndarray] | None) -> tuple[CacheEntry, bytes, bytes, str | None]:
    """(entry as readers will see it, JSON bytes, sidecar bytes, sidecar name)."""
    if not isinstance(payload, Mapping):
        raise CacheError(f"payload for kind {kind!r} must be a mapping, got {type(payload).__name__}")
    if isinstance(cost_s, bool) or not isinstance(cost_s, (int, float)) or not math.isfinite(cost_s) or cost_s < 0:
        raise CacheError(f"cost_s must be a finite number of seconds >= 0, got {cost_s!r}")
    if arrays is not None and not isinstance(arrays, Mapping):
        raise CacheError(f"arrays must be a mapping of name -> array, got {type(arrays).__name__}")
    frozen = {}
    for name, value in (arrays or {}).items():
        array = np.array(value, order="C")  # a private copy: callers may reuse their buffers
        if not isinstance(name, str) or not name or array.dtype.kind not in "biuf":
            raise CacheError(f"array {name!r} must have a non-empty str name and a numeric dtype, got {array.dtype}")
        array.setflags(write=False)
        frozen[name] = array
    blob, sidecar, spec = b"", None, None
    if frozen:
        blob = safetensors.numpy.save(frozen)
        sidecar = f"{digest}.{secrets.token_hex(8)}.safetensors"
        spec = {"file": sidecar, "bytes": len(blob),
                "tensors": {n: {"dtype": str(a.dtype), "shape": list(a.shape)} for n, a in frozen.items()}}
    doc = {"format": FORMAT, "kind": kind, "namespace": namespace, "digest": digest, "payload": payload,
           "cost_s": float(cost_s), "created_at": time.time(), "arrays": spec}
    try:
        text = _dump(doc)
    except (TypeError, ValueError) as exc:
        raise CacheError(f"payload for kind {kind!r} is not JSON-serialisable: {exc}") from None
    entry = CacheEntry(kind, namespace, digest, json.loads(text)["payload"], frozen, float(cost_s), doc["created_at"])
    return entry, text, blob, sidecar


def _decode(raw: bytes, kind: str, namespace: str, digest: str, shard: str) -> CacheEntry:
    """Parse and validate one entry file (+ its sidecar). Raises ValueError & co. when corrupt."""
    if not raw:
        raise ValueError("empty file")
    doc = json.loads(raw)
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    if (doc.get("kind"), doc.get("namespace"), doc.get("digest")) != (kind, namespace, digest):
        raise ValueError("its key does not match its place")
    payload, cost, created, spec = doc["payload"], doc["cost_s"], doc["created_at"], doc.get("arrays")
    if not isinstance(payload, dict):
        raise ValueError("payload is not an object")
    for value in (cost, created):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"bad cost_s/created_at {value!r}")
    arrays: dict[str, np.ndarray] = {}
    if spec is not None:
        name, tensors = spec["file"], spec["tensors"]
        m = _SIDECAR.fullmatch(name) if isinstance(name, str) else None
        if m is None or m.group(1) != digest or not isinstance(tensors, dict):
            raise ValueError("bad arrays record")
        try:
            with open(os.path.join(shard, name), "rb") as f:
                blob = f.read()
        except FileNotFoundError:
            raise _SidecarGone from None
        if len(blob) != spec["bytes"]:
            raise ValueError(f"sidecar has {len(blob)} bytes, expected {spec['bytes']}")
        arrays = safetensors.numpy.load(blob)
        if set(arrays) != set(tensors):
            raise ValueError(f"sidecar holds {sorted(arrays)}, expected {sorted(tensors)}")
        for key, array in arrays.items():
            want = tensors[key]
            if str(array.dtype) != want["dtype"] or list(array.shape) != want["shape"]:
                raise ValueError(f"array {key!r} is {array.dtype}{list(array.shape)}, expected {want}")
            array.setflags(write=False)
    return CacheEntry(kind, namespace, digest, payload, arrays, float(cost), float(created))


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _dump(doc) -> bytes:
    return json.dumps(doc, sort_keys=True, allow_nan=False, separators=(",", ":"), default=_json_default).encode()


def _add_line(key: tuple[str, str], meta: _Meta) -> str:
    return f"+ {key[0]} {key[1]} {meta.recency_ns} {meta.nbytes} {meta.sidecar or '-'}\n"


def _named_sidecar(json_path: str) -> str | None:
    """The sidecar an entry file names, or None (no file, no arrays, unreadable)."""
    try:
        with open(json_path, "rb") as f:
            name = json.loads(f.read())["arrays"]["file"]
        return name if isinstance(name, str) and _SIDECAR.fullmatch(name) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_temp(directory: str | Path, data: bytes, fsync: bool = True) -> str:
    tmp = os.path.join(directory, f".{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
    except BaseException:
        _unlink(tmp)
        raise
    return tmp


def _atomic_write(path: str | Path, data: bytes, fsync: bool = True) -> None:
    tmp = _write_temp(os.path.dirname(path), data, fsync)
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise


def _unlink(path: str | Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass  # another process won the race, or the disk is read-only


def _fresh_stats() -> dict:
    return {"format": FORMAT, "epoch": secrets.token_hex(8), "per_kind": {},
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _load_stats(path: Path) -> dict | None:
    try:
        doc = json.loads(path.read_bytes())
        if isinstance(doc, dict) and isinstance(doc.get("epoch"), str) and isinstance(doc.get("per_kind"), dict) \
                and isinstance(doc.get("since"), str):
            return doc
    except (OSError, ValueError):
        pass
    return None


def _flush_at_exit(ref: "weakref.ref[PromptCache]") -> None:
    cache = ref()
    if cache is not None and not cache._degraded:
        cache._try_flush(timeout=1.0)
