"""Persistent prompt cache, public API: keys, ``PromptCache``, its RAM layer, single-flight and faults.

Owns: keeping the results of expensive per-clip work (FunASR tokens, decoder prompt features, ...)
on disk and in RAM under the key ``kind`` + ``namespace`` + ``digest``; the key helpers
(:func:`audio_digest`, :func:`fingerprint_files`, :func:`make_namespace`); the RAM layer; one
computation per key in flight (``get_or_compute``); the folder lock (``<root>/.lock``) and the order
of steps that makes reads, writes, eviction and ``clear()`` safe between processes; when counters
are flushed; memory-only mode on disk faults; every log message of the cache; ``check()``; the
memo of model-file SHA-256 digests (``<root>/file_hashes.json``) behind :func:`fingerprint_files`.
Does not own: the file format, atomic writes and folder scans (``funasr_cache.files``); the index,
its journal and LRU eviction (``funasr_cache.index``); counters and ``stats.json``
(``funasr_cache.stats``); what a
namespace means (callers pass model identity + preprocessing version), what a payload holds, which
models exist. ``docs/cache.md`` is the long-form contract; in short:

    * No partial reads (the entry JSON is published last, as the commit point). Thread- and
      process-safe: writes, eviction, clear and stats.json take one ``filelock`` lock; reads take none.
    * A corrupt entry is a miss, logged at WARNING once and deleted. Unknown JSON fields are ignored.
    * After each write, entries <= max_entries and entry bytes <= max_bytes over all processes; least
      recently used go first (recency = the JSON's mtime, so the order survives restarts).
    * The RAM layer serves an entry only while its file exists. Concurrent misses for one key in
      one process compute once.
    * Not guaranteed: network filesystems, clock skew between writers, durability across power
      loss, forking a live instance.
    * I/O errors on read are misses. A write that meets a read-only or full disk (any ``OSError``)
      switches to memory-only caching with one WARNING and retries the disk after a minute; a lock
      busy for 10 s skips the disk write. The cache never raises for I/O trouble; malformed kinds,
      digests or payloads raise :class:`core.errors.CacheError` (a caller bug).
    * ``snapshot()`` (= ``stats(flush=False)``; every read path: /metrics, the API's and the page's cache
      stats) takes no lock and writes nothing. Lookups made
      inside ``uncounted()`` (e.g. a voice export) change no hit/miss/saved-seconds counter.
      ``add()`` never replaces an existing entry (imports use it); ``discard()`` removes one.
    * A :class:`PromptSource` (``set_source``; the studio passes its voice database) is asked on a
      miss before computing: what it returns is stored here with its original ``cost_s`` and
      counted as ``store_fills`` (the lookup itself still counts as a miss). A source that fails
      is logged and treated as having nothing. Entries computed here are offered to the source.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import secrets
import shutil
import threading
import time
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Protocol

import numpy as np
from filelock import FileLock, Timeout
from safetensors import SafetensorError

from core.errors import CacheError
from funasr_cache.files import (  # noqa: F401  (public names, defined there since the split)
    FOLDER,
    FORMAT,
    CacheEntry,
    PromptEntry,
    EntryMeta,
    SidecarGone,
    atomic_write,
    audit_files,
    check_key,
    decode_entry,
    dump_json,
    encode_entry,
    entry_path,
    folder_name,
    named_sidecar,
    unlink_quiet,
    write_temp,
)
from funasr_cache.index import DiskIndex
from funasr_cache.stats import Counters, load_stats

log = logging.getLogger(__name__)

_LOCK_TIMEOUT_S = 10.0
_RETRY_DISK_S = 60.0
_FLUSH_EVERY_S = 2.0  # hits reach stats.json at most this late (puts flush at once)


def audio_digest(samples: np.ndarray, sample_rate: int) -> str:
    """The cache key of a clip: SHA-256 (64 hex) over float32 little-endian samples, rate and shape.

    Hash the *decoded, preprocessed* samples so that any file name or container that decodes to
    the same samples gives the same key. SHA-256 was faster than BLAKE2b on the x86 CPUs we measured
    (SHA-NI; see docs/performance.md); the choice is fixed because keys must agree across machines.

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


HASH_MEMO = "file_hashes.json"
_HASH_MEMO_MAX = 512       # memo records kept (a model folder has a few dozen files)
_memo_lock = threading.Lock()


def fingerprint_files(paths: Iterable[Path | str], memo_dir: Path | str | None = None) -> str:
    """16 hex identifying the *contents* of ``paths``: SHA-256 over each file's name and SHA-256.

    Two copies of one model (other hosts, other mtimes) share a fingerprint; a fine-tune with the
    same size and a preserved mtime does not. Hashing a model file reads all of it, so each digest
    is memoised in ``memo_dir/file_hashes.json`` under the file's (st_dev, st_ino, size,
    mtime_ns, ctime_ns). The ctime is there because an in-place rewrite keeps the inode and can
    restore the mtime (``touch -r``, ``cp -p``), but always sets the ctime, which no user can set
    back. A missing file counts as "missing", so creating it later changes the fingerprint.

    Parameters:
        paths: the files that determine a cached value (order does not matter).
        memo_dir: the cache folder, or None to hash without a memo.
    """
    memo_path = Path(memo_dir) / HASH_MEMO if memo_dir is not None else None
    memo = _read_memo(memo_path)
    changed = False
    h = hashlib.sha256()
    for p in sorted(Path(x) for x in paths):
        try:
            st = p.stat()
        except FileNotFoundError:
            h.update(f"{p.name}|missing\n".encode())
            continue
        key = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
        digest = memo.get(key)
        if not (isinstance(digest, str) and len(digest) == 64):
            started = time.perf_counter()
            digest = _sha256_file(p)
            log.info("hashed %s (%d bytes) in %.1f s for the cache namespace", p, st.st_size,
                     time.perf_counter() - started)
            memo[key], changed = digest, True
        h.update(f"{p.name}|{digest}\n".encode())
    if changed and memo_path is not None:
        _write_memo(memo_path, memo)
    return h.hexdigest()[:16]


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _read_memo(path: Path | None) -> dict:
    if path is None:
        return {}
    try:
        doc = json.loads(path.read_bytes())
        files = doc.get("files") if isinstance(doc, dict) else None
        return dict(files) if isinstance(files, dict) else {}
    except (OSError, ValueError):
        return {}  # missing or damaged: hash again


def _write_memo(path: Path, memo: dict) -> None:
    # Merge with what another process may have written meanwhile; newest records win, oldest go.
    with _memo_lock:
        merged = {**_read_memo(path), **memo}
        kept = dict(list(merged.items())[-_HASH_MEMO_MAX:])
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, dump_json({"format": FORMAT, "files": kept}), fsync=False)
        except OSError as exc:  # read-only cache folder: the next start hashes again
            log.warning("prompt cache: cannot write %s (%s); model files are hashed again next start", path, exc)


def make_namespace(model: str, fingerprint: str, version: int | str, numerics: str = "") -> str:
    """``model@fingerprint/vversion`` (``.../vversion/numerics`` when given): everything besides
    the clip that determines a value. ``numerics`` names the arithmetic (e.g. ``cpu-fp32``,
    ``cuda-tf32``) where it can change a discrete result."""
    return f"{model}@{fingerprint}/v{version}" + (f"/{numerics}" if numerics else "")


Compute = Callable[[], "tuple[Mapping, Mapping[str, np.ndarray] | None]"]


class _Flight:
    __slots__ = ("done", "entry", "error")

    def __init__(self) -> None:
        self.done, self.entry, self.error = threading.Event(), None, None


class _Lost(Exception):
    """A concurrent clear() removed the folder an entry was being published into."""


class _Exists(Exception):
    """``add()`` found an entry already committed under the key."""


class PromptSource(Protocol):
    """Somewhere else a clip's prompt entries may already exist (the studio's voice database);
    this package only calls it. ``fetch`` returns ``(payload, arrays or None, cost_s)`` or None.
    A source may also have ``offer(kind, namespace, digest, payload, arrays, cost_s)``, called with
    every entry this cache computed (it keeps what it wants; errors are logged and ignored)."""

    def fetch(self, kind: str, namespace: str, digest: str) -> "tuple[Mapping, Mapping[str, np.ndarray] | None, float] | None":
        ...


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
        self._mlock = threading.Lock()  # RAM layer and flights (counters have their own lock)
        self._dlock = threading.RLock()  # this process's share of the folder lock
        self._flock: FileLock | None = None
        self._ix = DiskIndex(self.root)
        self._folders: dict[tuple[str, str], str] = {}
        self._made: set[str] = set()
        self._flights: dict[tuple[str, str, str], _Flight] = {}
        self._counts = Counters()
        self._warned: set = set()
        self._degraded, self._retry_at = "", 0.0
        self._quiet = threading.local()  # .active: lookups in this thread are not counted
        self._source: PromptSource | None = None
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
        if getattr(self._quiet, "active", False):
            return entry
        self._counts.add_lookup(kind, entry.cost_s if entry else None)
        if time.monotonic() - self._counts.last_flush > _FLUSH_EVERY_S:
            self._try_flush(timeout=0)
        return entry

    @contextmanager
    def uncounted(self) -> Iterator[None]:
        """Lookups made by this thread inside the block count as neither hits nor misses (nor
        seconds saved): for reading entries to copy them, e.g. a voice export."""
        before = getattr(self._quiet, "active", False)
        self._quiet.active = True
        try:
            yield
        finally:
            self._quiet.active = before

    def add(self, kind: str, namespace: str, digest: str, payload: Mapping, cost_s: float,
            arrays: Mapping[str, np.ndarray] | None = None) -> bool:
        """Store an entry only if none exists under the key (checked under the folder lock); True
        when it was stored. Counts a put, never a hit or miss.

        Raises:
            CacheError: as :meth:`put`.
        """
        folder = self._folder(kind, namespace, digest)
        if self._lookup(kind, namespace, digest, folder) is not None:
            return False
        entry, text, blob, sidecar = encode_entry(kind, namespace, digest, payload, cost_s, arrays)
        fits = len(text) + len(blob) <= self.max_bytes
        try:
            on_disk = fits and self._disk_ok() and self._publish(folder, entry, text, blob, sidecar, exclusive=True)
        except _Exists:
            return False
        self._counts.add(kind, "puts")
        self._remember(entry, on_disk)
        return True

    def discard(self, kind: str, namespace: str, digest: str) -> None:
        """Remove one entry (RAM and disk) if it exists; I/O trouble is logged, never raised.

        Raises:
            CacheError: malformed key.
        """
        folder = self._folder(kind, namespace, digest)
        with self._mlock:
            self._mem.pop((kind, namespace, digest), None)
        if self._flock is None:
            return
        path = entry_path(self.root, folder, digest)
        try:
            with self._locked():
                self._unlink_entry_locked(path, folder, digest)
        except (OSError, Timeout) as exc:
            log.warning("prompt cache: could not remove %s (%s)", path, exc)

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
        entry, text, blob, sidecar = encode_entry(kind, namespace, digest, payload, cost_s, arrays)
        self._counts.add(kind, "puts")
        # An entry over max_bytes on its own would first evict every other entry, then itself.
        fits = len(text) + len(blob) <= self.max_bytes
        on_disk = fits and self._disk_ok() and self._publish(folder, entry, text, blob, sidecar)
        self._remember(entry, on_disk)
        return entry

    def set_source(self, source: PromptSource | None) -> None:
        """Fill misses from ``source`` before computing (None: compute only)."""
        self._source = source

    def get_or_compute(self, kind: str, namespace: str, digest: str, compute: Compute) -> tuple[CacheEntry, bool]:
        """``(entry, hit)``; :meth:`lookup` without saying where a miss was filled from."""
        entry, origin = self.lookup(kind, namespace, digest, compute)
        return entry, origin == "hit"

    def lookup(self, kind: str, namespace: str, digest: str, compute: Compute) -> tuple[CacheEntry, str]:
        """``(entry, origin)``: origin is ``"hit"`` (found here), ``"store"`` (filled from the
        :class:`PromptSource`), ``"computed"`` or ``"shared"`` (a concurrent caller's fill or
        computation). On a miss the source is asked first; then ``compute()`` -> ``(payload,
        arrays or None)`` runs once per key in this process (concurrent callers wait and share it);
        its wall time is stored as ``cost_s``.

        Raises:
            CacheError: malformed key, or ``compute`` returned something other than a pair.
            Whatever ``compute`` raises, in every caller waiting for it; nothing is stored then.
        """
        entry = self.get(kind, namespace, digest)
        if entry is not None:
            return entry, "hit"
        mkey = (kind, namespace, digest)
        with self._mlock:
            flight = self._flights.get(mkey)
            leader = flight is None
            if leader:
                flight = self._flights[mkey] = _Flight()
        if not leader:
            flight.done.wait()
            self._counts.add(kind, "coalesced")
            if flight.error is not None:
                raise flight.error
            return flight.entry, "shared"
        try:
            origin = "shared"
            flight.entry = self._lookup(kind, namespace, digest, self._folder(kind, namespace, digest))
            if flight.entry is None:  # nobody finished it between our miss and our leadership
                flight.entry, origin = self._from_source(kind, namespace, digest), "store"
            if flight.entry is None:
                start = time.perf_counter()
                result = compute()
                cost = time.perf_counter() - start
                if not (isinstance(result, (tuple, list)) and len(result) == 2):
                    raise CacheError(f"compute() for kind {kind!r} must return (payload, arrays), got {type(result).__name__}")
                flight.entry, origin = self.put(kind, namespace, digest, result[0], cost, result[1]), "computed"
                self._offer_to_source(flight.entry)
            return flight.entry, origin
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            with self._mlock:
                self._flights.pop(mkey, None)
            flight.done.set()

    def _offer_to_source(self, entry: CacheEntry) -> None:
        """Hand a computed entry to the source (it keeps those of its clips, e.g. a stored voice's
        entries under a new model's namespace, so other hosts need not compute them again)."""
        offer = getattr(self._source, "offer", None)
        if offer is None:
            return
        try:
            offer(entry.kind, entry.namespace, entry.digest, dict(entry.payload), dict(entry.arrays), float(entry.cost_s))
        except Exception as exc:  # noqa: BLE001 - the source is an optimisation; the request has its entry
            log.warning("prompt source did not keep %s/%s %s (%s: %s)", entry.kind, entry.namespace, entry.digest[:12],
                        type(exc).__name__, exc)

    def _from_source(self, kind: str, namespace: str, digest: str) -> CacheEntry | None:
        """The entry from the prompt source, stored here; None when there is none (or it failed)."""
        source = self._source
        if source is None:
            return None
        try:
            found = source.fetch(kind, namespace, digest)
            if found is None:
                return None
            payload, arrays, cost_s = found
            entry = self.put(kind, namespace, digest, payload, float(cost_s), arrays)
        except Exception as exc:  # noqa: BLE001 - a source that fails is a source with nothing
            log.warning("prompt source could not fill %s/%s %s (%s: %s); computing it", kind, namespace,
                        digest[:12], type(exc).__name__, exc)
            return None
        self._counts.add(kind, "store_fills")
        log.debug("filled %s %s from the prompt source", kind, digest[:12])
        return entry

    def stats(self, flush: bool = True) -> dict:
        """JSON-able counters since the last ``clear()`` (all processes), plus current sizes.

        ``flush=False`` (for frequent scrapes) takes no lock and writes nothing: it reads
        ``stats.json`` as other processes last wrote it and adds this process's unflushed counts.
        """
        if not flush:
            shared = load_stats(self.root / "stats.json") if self._flock is not None else None
            totals, per_kind = self._counts.summary(list(self._ix.entries.items()), shared)
        else:
            if self._disk_ok():
                self._try_flush(timeout=_LOCK_TIMEOUT_S)
            totals, per_kind = self._counts.summary(list(self._ix.entries.items()))
        with self._mlock:
            mem = len(self._mem)
        return {**totals, "entries": len(self._ix), "bytes": self._ix.nbytes, "max_entries": self.max_entries,
                "max_bytes": self.max_bytes, "memory_entries": mem, "memory_capacity": self.memory_entries,
                "since": self._counts.persisted["since"], "degraded": bool(self._degraded),
                "degraded_reason": self._degraded, "root": str(self.root), "per_kind": per_kind}

    def snapshot(self) -> dict:
        """:meth:`stats` for read paths (the API's and the page's cache stats, /metrics): takes no lock,
        waits on no other process and writes nothing. Other processes' counters are as they last
        flushed them to ``stats.json``; entry counts are this process's view of the index (it catches
        up at this process's next write)."""
        return self.stats(flush=False)

    def clear(self) -> None:
        """Remove every entry (all processes see it) and reset the statistics."""
        with self._mlock:
            self._mem.clear()
        self._counts.reset()
        trash = []
        if self._flock is None:  # the folder never opened: RAM was all there was
            return
        try:
            with self._locked():
                for item in os.scandir(self.root):
                    if FOLDER.fullmatch(item.name) and item.is_dir(follow_symlinks=False):
                        trash.append(self.root / f".trash-{secrets.token_hex(8)}")
                        os.rename(item.path, trash[-1])  # readers see the folder vanish at once
                self._ix.reset({})
                self._made.clear()
                self._ix.write_snapshot_locked()
                self._counts.save_locked(self.root / "stats.json")
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
                self._ix.sync_locked()
        except (OSError, Timeout):
            pass
        return len(self._ix)

    def close(self) -> None:
        """Write pending counters to disk (also done at interpreter exit)."""
        self._try_flush(timeout=1.0)

    def check(self) -> list[str]:
        """Audit the folder against the contract (reads every file); returns problems, [] if none."""
        problems = [f"memory-only: {self._degraded}"] if self._degraded else []
        try:
            with self._locked():
                self._ix.sync_locked()
                problems += self._audit_locked()
        except (OSError, Timeout) as exc:
            problems.append(f"cannot audit {self.root}: {exc}")
        return problems

    # ------------------------------------------------------------------ reading

    def _folder(self, kind: str, namespace: str, digest: str) -> str:
        check_key(kind, namespace, digest)
        folder = self._folders.get((kind, namespace))
        if folder is None:
            folder = self._folders[(kind, namespace)] = folder_name(kind, namespace)
        return folder

    def _lookup(self, kind: str, namespace: str, digest: str, folder: str) -> CacheEntry | None:
        mkey, path = (kind, namespace, digest), entry_path(self.root, folder, digest)
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
        meta = self._ix.entries.get((folder, digest))
        if meta is not None:
            meta.recency_ns = now
        return True

    def _read(self, path: str, kind: str, namespace: str, digest: str, folder: str) -> CacheEntry | None:
        for attempt in range(2):
            try:
                with open(path, "rb") as f:
                    ino = os.fstat(f.fileno()).st_ino
                    raw = f.read()
                return decode_entry(raw, kind, namespace, digest, os.path.dirname(path))
            except (FileNotFoundError, NotADirectoryError):
                return None
            except SidecarGone:
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

    def _unlink_entry_locked(self, path: str, folder: str, digest: str) -> None:
        """Remove an entry's file, its sidecar and its index row; the caller holds the file lock."""
        self._ix.sync_locked()
        meta = self._ix.entries.get((folder, digest))
        side = named_sidecar(path) or (meta.sidecar if meta else None)
        unlink_quiet(path)
        if side:
            unlink_quiet(os.path.join(os.path.dirname(path), side))
        if meta is not None:
            self._ix.remove_locked((folder, digest))

    def _discard_corrupt(self, path: str, ino: int, kind: str, folder: str, digest: str, reason: str) -> None:
        try:
            with self._locked(timeout=1.0):
                st = os.stat(path)
                if st.st_ino != ino:
                    return  # replaced by a writer since we read it
                self._unlink_entry_locked(path, folder, digest)
        except FileNotFoundError:
            return  # evicted meanwhile: not corrupt
        except (OSError, Timeout):
            pass  # read-only disk: leave the file, but still warn once
        if (path, ino) not in self._warned:
            self._warned.add((path, ino))
            log.warning("prompt cache: corrupt entry %s (%s); deleted, treated as a miss", path, reason)
            self._counts.add(kind, "corrupt")

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

    def _publish(self, folder: str, entry: CacheEntry, text: bytes, blob: bytes, sidecar: str | None,
                 exclusive: bool = False) -> bool:
        """Write the entry's files and commit it; False when it stays in RAM only. With
        ``exclusive``, raises :class:`_Exists` when an entry is already committed."""
        for _ in range(2):
            try:
                return self._publish_once(folder, entry, text, blob, sidecar, exclusive)
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

    def _publish_once(self, folder: str, entry: CacheEntry, text: bytes, blob: bytes, sidecar: str | None,
                      exclusive: bool = False) -> bool:
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
                atomic_write(side_path, blob)
            tmp = write_temp(shard, text)
            with self._locked():
                self._ix.sync_locked()
                if side_path and not os.path.exists(side_path):
                    raise _Lost
                if exclusive and os.path.exists(path):
                    raise _Exists
                old_side = named_sidecar(path)
                now = time.time_ns()
                os.utime(tmp, ns=(now, now))
                # Journal first: a writer killed before the rename leaves an over-count, never an under-count.
                self._ix.add_locked(key, EntryMeta(now, len(text) + len(blob), sidecar))
                try:
                    os.replace(tmp, path)
                except OSError:
                    self._ix.remove_locked(key)
                    raise
                tmp = side_path = None
                if old_side and old_side != sidecar:
                    unlink_quiet(os.path.join(shard, old_side))
                self._evict_locked()
                self._flush_locked()
        except FileNotFoundError:
            raise _Lost from None
        finally:
            for leftover in (tmp, side_path):
                if leftover:
                    unlink_quiet(leftover)
        self._recovered()
        return key in self._ix.entries

    def _ensure_folder(self, folder: str, kind: str, namespace: str) -> None:
        if folder in self._made:
            return
        path = self.root / folder
        path.mkdir(parents=True, exist_ok=True)
        if not (path / "namespace.json").exists():
            atomic_write(path / "namespace.json", dump_json({"kind": kind, "namespace": namespace}))
        self._made.add(folder)

    # ------------------------------------------------------------------ opening and eviction

    def _open(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._flock = FileLock(str(self.root / ".lock"), timeout=_LOCK_TIMEOUT_S, thread_local=False)
            with self._locked():
                self._ix.rebuild_locked()
                self._evict_locked()
                self._flush_locked()
            self._recovered()
        except (OSError, Timeout) as exc:
            self._degrade(exc)

    def _evict_locked(self) -> None:
        self._ix.evict_locked(self.max_entries, self.max_bytes, lambda kind: self._counts.add(kind, "evictions"))

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
        path = self.root / "stats.json"
        self._counts.flush_locked(path, lambda: self._warn_once(
            "stats", "prompt cache: %s is unreadable; counting from zero", path))

    def _try_flush(self, timeout: float) -> None:
        self._counts.last_flush = time.monotonic()
        try:
            with self._locked(timeout=timeout):
                self._ix.sync_locked()
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

    def _recovered(self) -> None:
        if self._degraded:
            log.info("prompt cache: %s is writable again; leaving memory-only mode", self.root)
            self._degraded = ""

    def _warn_once(self, key, msg: str, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)

    def _audit_locked(self) -> list[str]:
        problems, seen = audit_files(self.root, known=(".lock", "journal", "stats.json", HASH_MEMO))
        for key in seen ^ set(self._ix.entries):
            problems.append(f"index and disk disagree on {key[0]}/{key[1]}")
        if len(self._ix) > self.max_entries or self._ix.nbytes > self.max_bytes:
            problems.append(f"over capacity: {len(self._ix)} entries, {self._ix.nbytes} bytes")
        if (self.root / "stats.json").exists() and load_stats(self.root / "stats.json") is None:
            problems.append("stats.json is unreadable")
        return problems


def _flush_at_exit(ref: "weakref.ref[PromptCache]") -> None:
    cache = ref()
    if cache is not None and not cache._degraded:
        cache._try_flush(timeout=1.0)
