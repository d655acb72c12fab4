"""On-disk format of the prompt cache: key layout, entry files, sidecars, atomic writes, folder scans.

Owns: what one entry looks like on disk and in memory (:class:`CacheEntry`, :class:`EntryMeta`);
validating a key and mapping it to a folder and path; encoding an entry to JSON + a safetensors
sidecar and decoding/validating it back; writing files atomically (temp file in the same folder,
fsync, ``os.replace``); scanning shard folders into index records (stat only) and removing stale
temporary files and orphan sidecars; the file part of the ``check()`` audit.
Does not own: locking, the index and its journal, eviction (``funasr_cache.index``); the RAM layer,
statistics, degraded mode and every log message (``funasr_cache``, the public API). Nothing here
logs or takes a lock: functions raise or return and the caller decides what a failure means.
``docs/cache.md`` ("On disk") is the contract these files implement.

Layout (``nshash`` = 16 hex of BLAKE2b over kind and namespace, so no caller string is a path)::

    <root>/<kind>-<nshash>/namespace.json                 the namespace in clear, for people
    <root>/<kind>-<nshash>/<hh>/<digest>.json             one entry; hh = digest[:2], 256 shards
    <root>/<kind>-<nshash>/<hh>/<digest>.<tok>.safetensors   its arrays, if any (tok is random)
    <root>/<kind>-<nshash>/<hh>/.<random>.tmp             a write in progress
    <root>/.trash-<random>/                               a folder being removed by clear()
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import safetensors.numpy
from safetensors import SafetensorError

from core.errors import CacheError

FORMAT = 1  # written into every JSON file; readers ignore fields they do not know
KIND = re.compile(r"[a-z][a-z0-9_]{0,31}")
DIGEST = re.compile(r"[0-9a-f]{64}")
FOLDER = re.compile(r"[a-z][a-z0-9_]{0,31}-[0-9a-f]{16}")
SHARD = re.compile(r"[0-9a-f]{2}")
SIDECAR = re.compile(r"([0-9a-f]{64})\.[0-9a-f]{16}\.safetensors")
GRACE_S = 120.0  # temp files and unnamed sidecars younger than this may belong to a live writer

Key = tuple[str, str]  # (folder, digest): an entry's place on disk


@dataclass(frozen=True)
class PromptEntry:
    """One prompt-cache entry of a clip as it leaves the cache: carried in a voice bundle, or kept with a
    stored voice in the user-data database (so the engine and the store share this one type)."""

    kind: str
    namespace: str
    digest: str
    payload: Mapping
    arrays: Mapping[str, np.ndarray] = field(default_factory=dict)
    cost_s: float = 0.0


@dataclass(frozen=True)
class CacheEntry(PromptEntry):
    """One cached value: a :class:`PromptEntry` plus when it was stored. ``payload`` went through JSON
    (lists, not tuples or numpy); arrays are read-only. Both are shared with other callers: do not mutate."""

    created_at: float = 0.0


class EntryMeta:
    """Index record of one entry on disk: recency (the JSON's mtime, ns), bytes (JSON + sidecar) and
    the sidecar's file name (None without arrays). Mutable: a hit updates ``recency_ns``."""

    __slots__ = ("recency_ns", "nbytes", "sidecar")

    def __init__(self, recency_ns: int, nbytes: int, sidecar: str | None) -> None:
        self.recency_ns, self.nbytes, self.sidecar = recency_ns, nbytes, sidecar


class SidecarGone(Exception):
    """The JSON names a sidecar that is not there (a writer may have just replaced the entry)."""


# ---------------------------------------------------------------------- keys and paths

def check_key(kind: str, namespace: str, digest: str) -> None:
    """Raises:
        CacheError: kind, digest or namespace is malformed (checked in that order).
    """
    if not isinstance(kind, str) or not KIND.fullmatch(kind):
        raise CacheError(f"cache kind must match [a-z][a-z0-9_]{{0,31}}, got {kind!r:.80}")
    if not isinstance(digest, str) or not DIGEST.fullmatch(digest):
        raise CacheError(f"cache digest must be 64 lowercase hex characters (audio_digest), got {digest!r:.80}")
    if not isinstance(namespace, str) or not namespace:
        raise CacheError(f"cache namespace must be a non-empty string, got {namespace!r:.80}")


def folder_name(kind: str, namespace: str) -> str:
    """``<kind>-<nshash>`` for a validated kind and namespace."""
    nshash = hashlib.blake2b(f"{kind}\n{namespace}".encode(), digest_size=8).hexdigest()
    return f"{kind}-{nshash}"


def entry_path(root: str | Path, folder: str, digest: str) -> str:
    """The JSON file of the entry ``digest`` in ``folder``."""
    return os.path.join(root, folder, digest[:2], digest + ".json")


# ---------------------------------------------------------------------- entry files

def encode_entry(kind: str, namespace: str, digest: str, payload: Mapping, cost_s: float,
                 arrays: Mapping[str, np.ndarray] | None) -> tuple[CacheEntry, bytes, bytes, str | None]:
    """(entry as readers will see it, JSON bytes, sidecar bytes, sidecar name or None).

    Raises:
        CacheError: payload not a JSON-able mapping, negative/NaN cost, non-numeric array.
    """
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
        text = dump_json(doc)
    except (TypeError, ValueError) as exc:
        raise CacheError(f"payload for kind {kind!r} is not JSON-serialisable: {exc}") from None
    entry = CacheEntry(kind, namespace, digest, json.loads(text)["payload"], frozen, float(cost_s), doc["created_at"])
    return entry, text, blob, sidecar


def decode_entry(raw: bytes, kind: str, namespace: str, digest: str, shard: str) -> CacheEntry:
    """Parse and validate one entry file's bytes (+ its sidecar in folder ``shard``).

    Raises:
        SidecarGone: the sidecar it names does not exist.
        ValueError, TypeError, KeyError, SafetensorError: the entry is corrupt.
        OSError: the sidecar cannot be read.
    """
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
        m = SIDECAR.fullmatch(name) if isinstance(name, str) else None
        if m is None or m.group(1) != digest or not isinstance(tensors, dict):
            raise ValueError("bad arrays record")
        try:
            with open(os.path.join(shard, name), "rb") as f:
                blob = f.read()
        except FileNotFoundError:
            raise SidecarGone from None
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


def dump_json(doc) -> bytes:
    """The house JSON encoding of every cache file: sorted keys, no NaN, no spaces, numpy as numbers."""
    return json.dumps(doc, sort_keys=True, allow_nan=False, separators=(",", ":"), default=_json_default).encode()


def named_sidecar(json_path: str) -> str | None:
    """The sidecar an entry file names, or None (no file, no arrays, unreadable)."""
    try:
        with open(json_path, "rb") as f:
            name = json.loads(f.read())["arrays"]["file"]
        return name if isinstance(name, str) and SIDECAR.fullmatch(name) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ---------------------------------------------------------------------- atomic writes

def write_temp(directory: str | Path, data: bytes, fsync: bool = True) -> str:
    """Write ``data`` to a new ``.<random>.tmp`` in ``directory`` and return its path (removed on error)."""
    tmp = os.path.join(directory, f".{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
    except BaseException:
        unlink_quiet(tmp)
        raise
    return tmp


def atomic_write(path: str | Path, data: bytes, fsync: bool = True) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new file, never a mix."""
    tmp = write_temp(os.path.dirname(path), data, fsync)
    try:
        os.replace(tmp, path)
    except BaseException:
        unlink_quiet(tmp)
        raise


def unlink_quiet(path: str | Path) -> None:
    """Remove a file; no error if it is gone or cannot be removed."""
    try:
        os.unlink(path)
    except OSError:
        pass  # another process won the race, or the disk is read-only


# ---------------------------------------------------------------------- scans and audit

def scan_root(root: Path) -> dict[Key, EntryMeta]:
    """The index from folder metadata (stat only; no entry is opened unless two sidecars compete).
    Also removes ``.trash-*`` folders left by a killed clear(), and stale temp files/orphan sidecars."""
    shards = []
    for top in os.scandir(root):
        if top.name.startswith(".trash-"):
            shutil.rmtree(top.path, ignore_errors=True)  # left by a clear() that was killed
        elif FOLDER.fullmatch(top.name) and top.is_dir(follow_symlinks=False):
            shards += [(top.name, s.path) for s in os.scandir(top.path)
                       if SHARD.fullmatch(s.name) and s.is_dir(follow_symlinks=False)]
    old = time.time() - GRACE_S
    return {key: meta for folder, shard in shards for key, meta in scan_shard(folder, shard, old)}


def scan_shard(folder: str, shard: str, old: float) -> list[tuple[Key, EntryMeta]]:
    """Index records of one shard folder; removes temp files and orphan sidecars older than ``old``."""
    jsons, sides = {}, defaultdict(list)
    for item in os.scandir(shard):
        name = item.name
        try:
            if name.endswith(".json") and DIGEST.fullmatch(name[:-5]):
                jsons[name[:-5]] = item.stat(follow_symlinks=False)
            elif m := SIDECAR.fullmatch(name):
                sides[m.group(1)].append((name, item.stat(follow_symlinks=False)))
            elif name.endswith(".tmp") and item.stat(follow_symlinks=False).st_mtime < old:
                unlink_quiet(item.path)  # from a writer that died
        except FileNotFoundError:
            continue
    records = []
    for digest, st in jsons.items():
        found, named, extra = sides.pop(digest, []), None, 0
        if len(found) == 1:  # the usual case: the one sidecar is the entry's
            named = found[0][0]
        elif found:  # a writer died mid-replace: ask the entry which one it names
            named = named_sidecar(os.path.join(shard, digest + ".json"))
        for name, sst in found:
            if name == named:
                extra = sst.st_size
            elif sst.st_mtime < old:
                unlink_quiet(os.path.join(shard, name))
        records.append(((folder, digest), EntryMeta(st.st_mtime_ns, st.st_size + extra, named)))
    for found in sides.values():  # sidecars of entries that were never committed
        for name, sst in found:
            if sst.st_mtime < old:
                unlink_quiet(os.path.join(shard, name))
    return records


def audit_files(root: Path, known: tuple[str, ...]) -> tuple[list[str], set[Key]]:
    """Read every file under ``root``: (problems found, keys of the entry files seen).

    ``known`` names the top-level files that belong there besides namespace folders and
    ``.trash-*`` folders. Checks each ``namespace.json`` against its folder, every entry and sidecar
    (as :func:`decode_entry` does), and that no stale temp file or orphan sidecar is left.
    """
    problems, seen, old = [], set(), time.time() - GRACE_S
    for top in os.scandir(root):
        if not FOLDER.fullmatch(top.name):
            if top.name not in known and not top.name.startswith(".trash-"):
                problems.append(f"unexpected item {top.path}")
            continue
        try:
            ns = json.loads(Path(top.path, "namespace.json").read_bytes())
            kind, namespace = ns["kind"], ns["namespace"]
            check_key(kind, namespace, "0" * 64)
            if folder_name(kind, namespace) != top.name:
                raise ValueError("does not hash to its folder name")
        except (OSError, ValueError, KeyError, TypeError, CacheError) as exc:
            problems.append(f"{top.path}/namespace.json is missing or wrong ({exc})")
            continue
        for dirpath, _, names in os.walk(top.path):
            named = set()
            for name in names:
                path = os.path.join(dirpath, name)
                if name.endswith(".json") and DIGEST.fullmatch(name[:-5]):
                    seen.add((top.name, name[:-5]))
                    named.add(named_sidecar(path))
                    try:
                        decode_entry(Path(path).read_bytes(), kind, namespace, name[:-5], dirpath)
                    except (SidecarGone, ValueError, TypeError, KeyError, SafetensorError, OSError) as exc:
                        problems.append(f"{path}: unreadable entry ({type(exc).__name__} {exc})")
            for name in names:
                path = os.path.join(dirpath, name)
                stale = os.path.getmtime(path) < old
                if SIDECAR.fullmatch(name) and name not in named and stale:
                    problems.append(f"{path}: sidecar no entry names")
                elif name.endswith(".tmp") and stale:
                    problems.append(f"{path}: leftover temp file")
    return problems, seen
