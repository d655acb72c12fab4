"""Tests for funasr_cache: PromptCache (disk + RAM layers, LRU, capacity, corruption, faults,
stats, multi-process use) and the key helpers audio_digest / fingerprint_files / make_namespace.

Everything runs on the real filesystem in a temp dir; the multi-process tests use real 'spawn'
processes and a real SIGKILL, and the read-only test a real unwritable folder (chmod, or as root a
child process that drops to 'nobody'). Mocks appear only to inject disk faults (ENOSPC / EROFS).
"""

import errno
import hashlib
import json
import logging
import multiprocessing
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from core.errors import CacheError
from funasr_cache import store
from funasr_cache.store import PromptCache, audio_digest, fingerprint_files, make_namespace

NS = make_namespace("Step-Audio-Tokenizer", "0123456789abcdef", 1)


def key(i) -> str:
    return hashlib.sha256(f"clip-{i}".encode()).hexdigest()


def entry_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix in (".json", ".safetensors") and p.name != "namespace.json"
                  and p.parent.name != root.name)


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == "funasr_cache.store"]


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path / "cache"


# ------------------------------------------------------------------ keys


def test_same_samples_from_wav_and_flac_hit(tmp_path, root):
    from core.audio_io import load_audio  # here, not at the top: spawned workers must not import torch

    samples = (np.random.default_rng(1).integers(-20000, 20000, 16000) / 32768).astype(np.float32)
    sf.write(tmp_path / "a.wav", samples, 16000, subtype="PCM_16")
    sf.write(tmp_path / "renamed.flac", samples, 16000, subtype="PCM_16")
    wav, flac = load_audio(tmp_path / "a.wav"), load_audio(tmp_path / "renamed.flac")
    assert audio_digest(wav.samples, wav.sample_rate) == audio_digest(flac.samples, flac.sample_rate)
    cache = PromptCache(root)
    cache.put("tokens", NS, audio_digest(wav.samples, 16000), {"vq02": [1, 2, 3]}, 0.1)
    hit = PromptCache(root).get("tokens", NS, audio_digest(flac.samples, 16000))
    assert hit is not None and hit.payload == {"vq02": [1, 2, 3]}


def test_digest_depends_on_every_sample_and_the_rate():
    x = np.random.default_rng(0).standard_normal(48000).astype(np.float32)
    base = audio_digest(x, 48000)
    assert len(base) == 64 and int(base, 16) >= 0
    y = x.copy()
    y[-1] = np.nextafter(y[-1], np.float32(np.inf))
    assert audio_digest(y, 48000) != base
    assert audio_digest(x, 24000) != base
    assert audio_digest(x.astype(np.float64), 48000) == base  # converted to float32 first
    assert audio_digest(x[::-1][::-1], 48000) == base  # a non-contiguous view hashes its values
    with pytest.raises(CacheError):
        audio_digest(x, 0)


def test_namespace_change_is_a_miss(tmp_path, root):
    model = tmp_path / "model"
    model.mkdir()
    onnx = model / "speech_tokenizer_v1.onnx"
    onnx.write_bytes(b"a" * 100)
    ns1 = make_namespace("tok", fingerprint_files([onnx, model / "absent.npy"], root), 1)
    cache = PromptCache(root)
    cache.put("tokens", ns1, key(0), {"v": 1}, 0.1)
    assert cache.get("tokens", ns1, key(0)) is not None
    stat = onnx.stat()
    onnx.write_bytes(b"b" * 100)  # a fine-tune: same size, mtime preserved
    os.utime(onnx, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    ns2 = make_namespace("tok", fingerprint_files([onnx, model / "absent.npy"], root), 1)
    assert ns2 != ns1
    assert cache.get("tokens", ns2, key(0)) is None
    assert cache.get("tokens", make_namespace("tok", fingerprint_files([onnx]), 2), key(0)) is None
    assert cache.get("prompt_features", ns1, key(0)) is None  # another kind
    (model / "absent.npy").write_bytes(b"")
    assert fingerprint_files([onnx, model / "absent.npy"]) != fingerprint_files([onnx])


def test_fingerprint_is_by_content_and_memoised_per_file_identity(tmp_path, root):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    for folder, mtime in ((a, 1_000_000_000), (b, 2_000_000_000)):  # two hosts' copies
        (folder / "model.onnx").write_bytes(b"weights" * 1000)
        os.utime(folder / "model.onnx", ns=(mtime, mtime))
    assert fingerprint_files([a / "model.onnx"], root) == fingerprint_files([b / "model.onnx"]) \
        == fingerprint_files([b / "model.onnx"], tmp_path / "other-cache")
    # The memo holds each file's SHA-256 under (device, inode, size, mtime_ns, ctime_ns).
    memo = json.loads((root / "file_hashes.json").read_text())["files"]
    st = (a / "model.onnx").stat()
    assert memo[f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"] == \
        hashlib.sha256(b"weights" * 1000).hexdigest()
    # ... and is what later calls use for that identity (a poisoned record shows it is not re-hashed).
    before = fingerprint_files([a / "model.onnx"], root)
    memo[f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"] = "f" * 64
    (root / "file_hashes.json").write_text(json.dumps({"format": 1, "files": memo}))
    assert fingerprint_files([a / "model.onnx"], root) != before
    os.utime(a / "model.onnx", ns=(3_000_000_000, 3_000_000_000))  # a touch: a new identity, same content
    assert fingerprint_files([a / "model.onnx"], root) == before
    assert PromptCache(root).check() == []  # the memo file belongs in the cache folder


@pytest.mark.parametrize("kind", ["", "Tokens", "../x", "a" * 33, "tok-ens", "1abc", None, "tok\n"])
def test_bad_kind_is_rejected(root, kind):
    cache = PromptCache(root)
    with pytest.raises(CacheError, match="kind"):
        cache.get(kind, NS, key(0))
    with pytest.raises(CacheError, match="kind"):
        cache.put(kind, NS, key(0), {}, 0.0)


@pytest.mark.parametrize("digest", ["", "abc", key(0).upper(), key(0)[:-1] + "g", "../" + key(0)[3:],
                                    key(0) + "0", 123, key(0)[:63] + "\n"])
def test_bad_digest_is_rejected(root, digest):
    cache = PromptCache(root)
    with pytest.raises(CacheError, match="digest"):
        cache.get("tokens", NS, digest)
    with pytest.raises(CacheError, match="digest"):
        cache.get_or_compute("tokens", NS, digest, lambda: ({}, None))


def test_namespace_never_becomes_a_path(tmp_path, root):
    cache = PromptCache(root)
    with pytest.raises(CacheError, match="namespace"):
        cache.get("tokens", "", key(0))
    evil = "../../../" + str(tmp_path / "escape")
    cache.put("tokens", evil, key(1), {"v": 1}, 0.0)
    assert cache.get("tokens", evil, key(1)).payload == {"v": 1}
    assert not (tmp_path / "escape").exists()
    assert all(root in p.parents for p in tmp_path.rglob("*") if p != root)
    folder = next(p for p in root.iterdir() if p.is_dir())
    assert json.loads((folder / "namespace.json").read_text()) == {"kind": "tokens", "namespace": evil}


def test_bad_payload_and_arrays_are_rejected(root):
    cache = PromptCache(root)
    for payload in ({"x": float("nan")}, {"x": {1, 2}}, [1, 2]):
        with pytest.raises(CacheError):
            cache.put("tokens", NS, key(0), payload, 0.0)
    with pytest.raises(CacheError, match="cost_s"):
        cache.put("tokens", NS, key(0), {}, float("nan"))
    with pytest.raises(CacheError, match="numeric"):
        cache.put("tokens", NS, key(0), {}, 0.0, {"a": np.array(["x"])})
    with pytest.raises(CacheError, match="payload, arrays"):
        cache.get_or_compute("tokens", NS, key(0), lambda: {"v": 1})
    assert len(cache) == 0 and entry_files(root) == []


def test_docs_example_runs():
    text = (Path(__file__).resolve().parent.parent / "docs" / "cache.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    assert blocks
    for block in blocks:
        exec(compile(block, "docs/cache.md", "exec"), {})


# ------------------------------------------------------------------ basic behaviour


def test_put_get_and_persistence_across_instances(root):
    mel = np.random.default_rng(2).standard_normal((80, 57)).astype(np.float32)
    emb = np.arange(192, dtype=np.float32)
    cache = PromptCache(root)
    assert cache.get("prompt_features", NS, key(0)) is None
    put = cache.put("prompt_features", NS, key(0), {"vq06": np.arange(5), "n": np.int64(7)}, 0.25,
                    {"mel": mel, "spk": emb})
    mel[:] = 0  # the cache keeps its own copy
    assert put.payload == {"vq06": [0, 1, 2, 3, 4], "n": 7}
    again = PromptCache(root, memory_entries=0).get("prompt_features", NS, key(0))
    assert again.payload == put.payload and again.cost_s == 0.25 and again.created_at == put.created_at
    assert again.arrays["mel"].dtype == np.float32 and again.arrays["mel"].shape == (80, 57)
    np.testing.assert_array_equal(again.arrays["mel"], put.arrays["mel"])
    assert not again.arrays["mel"].flags.writeable and not put.arrays["mel"].flags.writeable
    np.testing.assert_array_equal(again.arrays["spk"], emb)
    assert len(PromptCache(root)) == 1 and PromptCache(root).check() == []


def test_layout_is_sharded_and_self_describing(root):
    cache = PromptCache(root)
    cache.put("tokens", NS, key(3), {"vq02": [4, 5]}, 0.5, {"a": np.zeros(3, np.int32)})
    (folder,) = [p for p in root.iterdir() if p.is_dir()]
    assert folder.name.startswith("tokens-")
    doc_path = folder / key(3)[:2] / f"{key(3)}.json"
    text = doc_path.read_text()
    doc = json.loads(text)
    assert text == json.dumps(doc, sort_keys=True, separators=(",", ":"))
    assert (doc["kind"], doc["namespace"], doc["digest"], doc["payload"], doc["cost_s"]) == \
        ("tokens", NS, key(3), {"vq02": [4, 5]}, 0.5)
    assert (doc_path.parent / doc["arrays"]["file"]).is_file()
    assert not list(root.rglob("*.tmp"))


def test_unknown_fields_are_ignored(root):
    cache = PromptCache(root)
    cache.put("tokens", NS, key(0), {"v": 1}, 0.0)
    (path,) = [p for p in entry_files(root) if p.suffix == ".json"]
    doc = json.loads(path.read_text())
    doc["added_by_a_newer_version"] = {"x": [1]}
    path.write_text(json.dumps(doc))
    assert PromptCache(root).get("tokens", NS, key(0)).payload == {"v": 1}


def test_memory_layer_is_bounded_and_sees_other_instances_clear(root):
    a, b = PromptCache(root, memory_entries=2), PromptCache(root, memory_entries=2)
    for i in range(3):
        a.put("tokens", NS, key(i), {"i": i}, 0.0)
    assert a.stats()["memory_entries"] == 2
    assert b.get("tokens", NS, key(0)).payload == {"i": 0}  # from disk, now in b's RAM
    a.clear()
    assert b.get("tokens", NS, key(0)) is None  # b's RAM copy is dropped once the file is gone
    assert len(b) == 0


# ------------------------------------------------------------------ LRU and capacity


def test_lru_order_survives_restart(root):
    cache = PromptCache(root, max_entries=3)
    for i in range(3):
        cache.put("tokens", NS, key(i), {"i": i}, 0.0)
    del cache
    PromptCache(root, max_entries=3, memory_entries=0).get("tokens", NS, key(0))  # 0 is now the newest
    restarted = PromptCache(root, max_entries=3)
    restarted.put("tokens", NS, key(3), {"i": 3}, 0.0)
    fresh = PromptCache(root, max_entries=3, memory_entries=0)
    assert [fresh.get("tokens", NS, key(i)) is not None for i in range(4)] == [True, False, True, True]
    assert fresh.stats()["evictions"] == 1


def test_capacity_by_count_and_bytes(root):
    big = np.zeros(10_000, np.float32)  # 40 kB sidecar
    cache = PromptCache(root, max_entries=100, max_bytes=150_000)
    for i in range(6):
        cache.put("prompt_features", NS, key(i), {"i": i}, 0.0, {"mel": big})
        on_disk = sum(p.stat().st_size for p in entry_files(root))
        assert on_disk <= 150_000 and on_disk == cache.stats()["bytes"]
    assert [cache.get("prompt_features", NS, key(i)) is not None for i in range(6)] == [False] * 3 + [True] * 3
    small = PromptCache(root, max_entries=2, max_bytes=150_000)  # lower limits apply at start-up
    assert len(small) == 2 and len(entry_files(root)) == 4
    assert small.get("prompt_features", NS, key(5)) is not None
    assert small.check() == []


def test_an_entry_larger_than_max_bytes_stays_in_memory_only(root):
    cache = PromptCache(root, max_bytes=1000)
    for i in (1, 2):
        cache.put("tokens", NS, key(i), {"i": i}, 0.0)
    small = entry_files(root)
    entry = cache.put("prompt_features", NS, key(0), {}, 0.0, {"mel": np.zeros(1000, np.float32)})
    assert entry_files(root) == small and len(cache) == 2  # and it did not push the others out first
    assert cache.get("prompt_features", NS, key(0)) is entry
    assert cache.stats()["evictions"] == 0 and cache.check() == []


# ------------------------------------------------------------------ corruption


def _corrupt(kind_of_damage: str, json_path: Path) -> None:
    doc = json.loads(json_path.read_text())
    side = json_path.parent / doc["arrays"]["file"]
    if kind_of_damage == "truncated":
        json_path.write_bytes(json_path.read_bytes()[:40])
    elif kind_of_damage == "garbage":
        json_path.write_bytes(b"\x00\xff not json")
    elif kind_of_damage == "empty":
        json_path.write_bytes(b"")
    elif kind_of_damage == "not_an_object":
        json_path.write_text("[1, 2, 3]")
    elif kind_of_damage == "no_payload":
        del doc["payload"]
        json_path.write_text(json.dumps(doc))
    elif kind_of_damage == "key_mismatch":
        doc["digest"] = key(99)
        json_path.write_text(json.dumps(doc))
    elif kind_of_damage == "sidecar_truncated":
        side.write_bytes(side.read_bytes()[:-7])
    elif kind_of_damage == "sidecar_missing":
        side.unlink()
    elif kind_of_damage == "wrong_shape":
        doc["arrays"]["tensors"]["mel"]["shape"] = [3, 2]
        json_path.write_text(json.dumps(doc))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "not_an_object", "no_payload",
                                    "key_mismatch", "sidecar_truncated", "sidecar_missing", "wrong_shape"])
def test_corrupt_entry_is_a_miss_warned_once_and_removed(root, caplog, damage):
    cache = PromptCache(root)
    cache.put("prompt_features", NS, key(0), {"v": 1}, 0.0, {"mel": np.ones((2, 3), np.float32)})
    (json_path,) = [p for p in entry_files(root) if p.suffix == ".json"]
    _corrupt(damage, json_path)
    reader = PromptCache(root, memory_entries=0)
    with caplog.at_level(logging.WARNING, logger="funasr_cache.store"):
        assert reader.get("prompt_features", NS, key(0)) is None
        assert reader.get("prompt_features", NS, key(0)) is None
    assert len(warnings_of(caplog)) == 1 and "corrupt" in warnings_of(caplog)[0]
    assert entry_files(root) == []
    stats = reader.stats()
    assert (stats["corrupt"], stats["misses"], stats["entries"]) == (1, 2, 0)
    assert reader.check() == []
    reader.put("prompt_features", NS, key(0), {"v": 2}, 0.0)  # the key works again
    assert PromptCache(root).get("prompt_features", NS, key(0)).payload == {"v": 2}


_OPENED: list[str] | None = None


def _record_open(event, args):
    if event == "open" and _OPENED is not None:
        _OPENED.append(str(args[0]))


sys.addaudithook(_record_open)  # observes real open() calls; hooks cannot be removed, so it is gated


def test_startup_reads_no_payload(root, caplog):
    global _OPENED
    cache = PromptCache(root)
    for i in range(3):
        cache.put("prompt_features", NS, key(i), {"i": i}, 0.0, {"mel": np.ones(4, np.float32)})
    cache.put("tokens", NS, key(0), {"no": "arrays"}, 0.0)
    path = root.glob(f"prompt_features-*/{key(1)[:2]}/{key(1)}.json").__next__()
    path.write_bytes(b"{broken")
    _OPENED = []
    try:
        with caplog.at_level(logging.WARNING, logger="funasr_cache.store"):
            restarted = PromptCache(root)
    finally:
        opened, _OPENED = _OPENED, None
    assert not [p for p in opened if p.endswith((".safetensors", ".json")) and "namespace" not in p
                and not p.endswith("stats.json")]
    with caplog.at_level(logging.WARNING, logger="funasr_cache.store"):
        assert len(restarted) == 4 and warnings_of(caplog) == []  # the index came from metadata only
        assert restarted.get("prompt_features", NS, key(1)) is None
    assert len(warnings_of(caplog)) == 1 and len(restarted) == 3


def test_check_reports_and_startup_cleans_leftovers(root):
    cache = PromptCache(root)
    cache.put("tokens", NS, key(0), {"i": 0}, 0.0)
    shard = next(root.glob("tokens-*/*/"))
    orphan = shard / f"{key(1)}.{'ab' * 8}.safetensors"  # a sidecar whose entry was never committed
    temp = shard / ".deadbeef.tmp"
    orphan.write_bytes(b"x")
    temp.write_bytes(b"x")
    assert cache.check() == []  # young files may belong to a live writer
    for p in (orphan, temp):
        os.utime(p, (time.time() - 3600, time.time() - 3600))
    problems = cache.check()
    assert len(problems) == 2 and any("sidecar" in p for p in problems) and any("temp" in p for p in problems)
    restarted = PromptCache(root)
    assert not orphan.exists() and not temp.exists() and restarted.check() == []


# ------------------------------------------------------------------ stats and single-flight


def test_stats_persist_and_measure_seconds_saved(root):
    cache = PromptCache(root)
    spent = []

    def compute():
        start = time.perf_counter()
        time.sleep(0.05)
        spent.append(time.perf_counter() - start)
        return {"vq02": [1]}, {"mel": np.zeros(4, np.float32)}

    first, hit = cache.get_or_compute("tokens", NS, key(0), compute)
    assert not hit and spent[0] <= first.cost_s < spent[0] + 0.05
    since = cache.stats()["since"]
    restarted = PromptCache(root, memory_entries=0)
    for _ in range(3):
        entry, hit = restarted.get_or_compute("tokens", NS, key(0), compute)
        assert hit and entry.cost_s == first.cost_s
    assert len(spent) == 1
    restarted.get("prompt_features", NS, key(0))
    restarted.close()
    stats = PromptCache(root).stats()
    assert (stats["hits"], stats["misses"], stats["puts"], stats["since"]) == (3, 2, 1, since)
    assert stats["hit_rate"] == 0.6 and stats["entries"] == 1
    assert stats["seconds_saved"] == pytest.approx(3 * first.cost_s, abs=1e-3)
    assert stats["per_kind"]["tokens"]["hits"] == 3 and stats["per_kind"]["prompt_features"]["misses"] == 1
    assert json.loads(json.dumps(stats)) == stats
    time.sleep(1.1)  # 'since' has one-second resolution
    restarted.clear()
    cleared = PromptCache(root).stats()
    assert (cleared["hits"], cleared["misses"], cleared["entries"], cleared["bytes"]) == (0, 0, 0, 0)
    assert cleared["since"] > since and entry_files(root) == []


def test_unreadable_stats_file_restarts_the_counts(root, caplog):
    cache = PromptCache(root)
    cache.put("tokens", NS, key(0), {"v": 1}, 0.0)
    (root / "stats.json").write_bytes(b"\x00garbage")
    with caplog.at_level(logging.WARNING, logger="funasr_cache.store"):
        fresh = PromptCache(root)
        assert fresh.get("tokens", NS, key(0)) is not None
        stats = fresh.stats()
    assert len(warnings_of(caplog)) == 1 and "stats.json" in warnings_of(caplog)[0]
    assert (stats["hits"], stats["puts"], stats["entries"]) == (1, 0, 1) and fresh.check() == []


def test_concurrent_misses_compute_once(root):
    cache = PromptCache(root)
    calls, results = [], []
    barrier = threading.Barrier(8)

    def compute():
        calls.append(1)
        time.sleep(0.2)
        return {"v": 42}, None

    def worker():
        barrier.wait()
        results.append(cache.get_or_compute("tokens", NS, key(0), compute))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 8
    assert all(e.payload == {"v": 42} and not hit for e, hit in results)
    assert cache.stats()["coalesced"] == 7


def test_compute_error_reaches_every_waiter_and_nothing_is_stored(root):
    cache = PromptCache(root)
    errors = []

    def compute():
        time.sleep(0.1)
        raise ValueError("model failed")

    def worker():
        try:
            cache.get_or_compute("tokens", NS, key(0), compute)
        except ValueError as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == ["model failed"] * 3 and len(cache) == 0


# ------------------------------------------------------------------ disk faults


def test_unusable_root_degrades_to_memory_only(tmp_path, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with caplog.at_level(logging.WARNING, logger="funasr_cache.store"):
        cache = PromptCache(blocker / "cache")
        for i in range(3):
            entry, hit = cache.get_or_compute("tokens", NS, key(i), lambda: ({"v": 1}, None))
            assert entry.payload == {"v": 1} and not hit
        assert cache.get("tokens", NS, key(0)).payload == {"v": 1}
        cache.clear()
    assert len(warnings_of(caplog)) == 1 and "memory only" in warnings_of(caplog)[0]
    stats = cache.stats()
    assert stats["degraded"] and "NotADirectoryError" in stats["degraded_reason"] and stats["hits"] == 0


def test_a_root_that_becomes_usable_is_used_and_logged(tmp_path, caplog, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    monkeypatch.setattr(store, "_RETRY_DISK_S", 0.0)
    cache = PromptCache(blocker / "cache")
    assert cache.stats()["degraded"]
    blocker.unlink()
    with caplog.at_level(logging.INFO, logger="funasr_cache.store"):
        cache.put("tokens", NS, key(0), {"v": 0}, 0.0)
    assert not cache.stats()["degraded"] and len(entry_files(blocker / "cache")) == 1
    assert any("writable again" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_full_or_read_only_disk_degrades_once_and_recovers(root, caplog, monkeypatch, code):
    cache = PromptCache(root)
    cache.put("tokens", NS, key(0), {"v": 0}, 0.0)

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(store, "_RETRY_DISK_S", 0.0)  # retry the disk on every put, still warn once
    monkeypatch.setattr(store.os, "fsync", fail)  # fault injection: every write fails
    with caplog.at_level(logging.WARNING, logger="funasr_cache.store"):
        for i in range(1, 4):
            assert cache.put("tokens", NS, key(i), {"v": i}, 0.0).payload == {"v": i}
        assert [cache.get("tokens", NS, key(i)).payload["v"] for i in range(4)] == [0, 1, 2, 3]
    assert len(warnings_of(caplog)) == 1 and cache.stats()["degraded"]
    assert len(entry_files(root)) == 1 and not list(root.rglob("*.tmp"))
    monkeypatch.undo()  # the disk works again
    cache.put("tokens", NS, key(5), {"v": 5}, 0.0)
    assert not cache.stats()["degraded"] and PromptCache(root).get("tokens", NS, key(5)) is not None


def _use_read_only_cache(root: str, drop_to_nobody: bool) -> dict:
    """Open a cache in a folder this process may read but not write; report what it saw."""
    if drop_to_nobody:  # root ignores permissions: become 'nobody' (imports are already done)
        os.setgid(65534)
        os.setuid(65534)
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage()) if record.levelno >= logging.WARNING else None
    logging.getLogger("funasr_cache.store").addHandler(handler)
    cache = PromptCache(root)
    old = cache.get("tokens", NS, key(0))
    put = cache.put("tokens", NS, key(1), {"v": 1}, 0.0)
    put_again = cache.put("tokens", NS, key(2), {"v": 2}, 0.0)
    stats = cache.stats()
    return {"old": old.payload if old else None, "put": put.payload, "again": put_again.payload,
            "new_hit": cache.get("tokens", NS, key(1)) is not None, "degraded": stats["degraded"],
            "reason": stats["degraded_reason"], "warnings": seen}


@pytest.mark.slow
def test_read_only_directory_still_serves_reads(tmp_path):
    """A real read-only folder: chmod 555 for a normal user; as root, a child that drops to 'nobody'."""
    as_root = os.geteuid() == 0
    base = Path(tempfile.mkdtemp(dir="/tmp")) if as_root else tmp_path  # pytest's tmp is private to root
    root = base / "cache"
    try:
        PromptCache(root).put("tokens", NS, key(0), {"v": 0}, 0.0)
        for path in [base, *base.rglob("*")]:
            path.chmod(0o755 if as_root and path.is_dir() else 0o644 if as_root else 0o555 if path.is_dir() else 0o444)
        if as_root:
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                seen = pool.apply(_use_read_only_cache, (str(root), True))
        else:
            seen = _use_read_only_cache(str(root), False)
        files_after = len(entry_files(root))
    finally:
        for path in [base, *base.rglob("*")]:
            path.chmod(0o755)
        if as_root:
            shutil.rmtree(base, ignore_errors=True)
    assert (seen["old"], seen["put"], seen["again"], seen["new_hit"]) == ({"v": 0}, {"v": 1}, {"v": 2}, True)
    assert seen["degraded"] and "Permission" in seen["reason"]
    assert len(seen["warnings"]) == 1 and "memory only" in seen["warnings"][0]
    assert files_after == 1  # nothing was written


# ------------------------------------------------------------------ several processes


def _stress_worker(args) -> dict:
    root, seed, ops = args
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage()) if record.levelno >= logging.WARNING else None
    logging.getLogger("funasr_cache.store").addHandler(handler)
    cache = PromptCache(root, max_entries=12, max_bytes=40_000, memory_entries=4)
    rng = random.Random(seed)
    counts = {"put": 0, "hit": 0, "miss": 0, "clear": 0}
    for _ in range(ops):
        k, op = rng.randrange(30), rng.random()
        if op < 0.45:
            cache.put("prompt_features", "ns", key(k), {"k": k, "vq": [k] * 50}, 0.01,
                      {"mel": np.full((8, 100 + k), k, np.float32)})
            counts["put"] += 1
        elif op < 0.97:
            entry = cache.get("prompt_features", "ns", key(k))
            if entry is not None:  # never torn: payload and sidecar belong together
                assert entry.payload == {"k": k, "vq": [k] * 50}
                assert entry.arrays["mel"].shape == (8, 100 + k) and (entry.arrays["mel"] == k).all()
            counts["hit" if entry else "miss"] += 1
        else:
            cache.clear()
            counts["clear"] += 1
    counts["warnings"] = seen
    return counts


@pytest.mark.slow
def test_four_processes_interleave_put_get_evict_clear(root):
    PromptCache(root)
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        results = pool.map(_stress_worker, [(str(root), seed, 150) for seed in range(4)])
    assert all(r["warnings"] == [] for r in results), results
    assert sum(r["put"] for r in results) > 200 and sum(r["hit"] for r in results) > 20
    assert sum(r["clear"] for r in results) > 0
    final = PromptCache(root, max_entries=12, max_bytes=40_000)
    jsons = [p for p in entry_files(root) if p.suffix == ".json"]
    assert len(jsons) <= 12 and sum(p.stat().st_size for p in entry_files(root)) <= 40_000
    assert final.check() == [] and len(final) == len(jsons)


def test_threads_share_instances_without_errors(root):
    caches = [PromptCache(root, max_entries=8, memory_entries=3), PromptCache(root, max_entries=8, memory_entries=3)]
    failures = []

    def worker(seed):
        rng = random.Random(seed)
        try:
            for _ in range(60):
                cache, k, op = caches[rng.randrange(2)], rng.randrange(12), rng.random()
                if op < 0.4:
                    cache.put("tokens", NS, key(k), {"k": k}, 0.0, {"a": np.full(10, k, np.int32)})
                elif op < 0.97:
                    entry = cache.get("tokens", NS, key(k))
                    assert entry is None or (entry.payload == {"k": k} and (entry.arrays["a"] == k).all())
                else:
                    cache.clear()
        except BaseException as exc:  # reported below, with the thread's traceback lost but the error kept
            failures.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert len(PromptCache(root, max_entries=8)) <= 8 and caches[0].check() == []


def _endless_writer(root: str) -> None:
    cache = PromptCache(root, max_entries=6, memory_entries=0)
    i = 0
    while True:
        cache.put("prompt_features", "ns", key(i), {"i": i}, 0.0, {"x": np.full(400_000, i, np.float32)})
        i += 1


def inodes(root: Path) -> set[int]:
    out = set()
    for path in root.glob("prompt_features-*/*/*.json"):
        try:
            out.add(path.stat().st_ino)
        except FileNotFoundError:
            pass
    return out


@pytest.mark.slow
def test_kill_9_of_a_writer_leaves_no_corrupt_entry(root, caplog):
    PromptCache(root)
    ctx = multiprocessing.get_context("spawn")
    rng = random.Random(0)
    mid_write = 0
    for _ in range(10):  # until two kills have landed inside a write
        if mid_write >= 2:
            break
        before = inodes(root)
        proc = ctx.Process(target=_endless_writer, args=(str(root),))
        proc.start()
        deadline = time.monotonic() + 30
        while inodes(root) <= before and time.monotonic() < deadline:  # until this writer has committed
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.2))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        assert proc.exitcode == -signal.SIGKILL
        temps = list(root.rglob("*.tmp"))
        sidecars, jsons = list(root.rglob("*.safetensors")), list(root.glob("prompt_features-*/*/*.json"))
        mid_write += bool(temps) or len(sidecars) != len(jsons)  # a temp file, or a sidecar not yet committed
        for temp in temps:  # so that the next round's evidence is its own
            temp.unlink()
    with caplog.at_level(logging.WARNING, logger="funasr_cache.store"):
        reader = PromptCache(root, max_entries=6, memory_entries=0)
        visible = [p for p in root.glob("prompt_features-*/*/*.json")]
        assert visible
        for path in visible:
            entry = reader.get("prompt_features", "ns", path.stem)
            assert entry is not None and (entry.arrays["x"] == entry.payload["i"]).all()
    assert warnings_of(caplog) == [] and reader.check() == [] and len(reader) == len(visible) <= 6
    assert mid_write >= 2  # kills did land inside writes (each put writes ~1.6 MB and fsyncs)
