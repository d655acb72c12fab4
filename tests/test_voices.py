"""userdata.voices, userdata.voice_audio, userdata.legacy and web.voices, without a server.

Covers, on SQLite and (when installed) on a real PostgreSQL: what is kept of a clip (bit-exact mono
samples, so the cache digest is unchanged; the clone speaker id of a multi-channel upload unchanged
while its other channels are not kept; 16-bit mono as FLAC), ids checked with fullmatch, quotas,
prompt entries stored with a voice and found by cache key, blobs shared and released, concurrent
creates and deletes of one voice from two "hosts" (two engines on one database), the import of the
old folder store; and the bundle: export/read of entries with their arrays, signatures, refusal of
malformed, oversized or pickled bundles, and member sizes checked before anything is read.
"""

import hashlib
import hmac
import io
import json
import tracemalloc
import zipfile

import numpy as np
import pytest
import soundfile as sf
from sqlalchemy import text

from core.audio_io import Audio, load_audio
from core.errors import InputError
from funasr_cache.store import PromptEntry, audio_digest
from llm.prompts import clone_speaker_id
from userdata.db import Database
from userdata.legacy import import_voice_folders
from userdata.voices import VoiceExists, VoiceQuotaExceeded
from web.voices import BundleEntry, VoiceNotFound, VoiceStore, check_voice_id, export_bundle, read_bundle

KEY = "a deployment secret of 32 chars"


@pytest.fixture
def store(database_url):
    db = Database(database_url)
    db.migrate()
    yield VoiceStore(db)
    db.close()


@pytest.fixture
def sqlite_store(tmp_path):
    """For the bundle tests: the format does not depend on the database."""
    db = Database(f"sqlite:///{tmp_path / 'bundles.db'}")
    db.migrate()
    yield VoiceStore(db)
    db.close()


def _audio(seed=0, rate=22050):
    rng = np.random.default_rng(seed)
    return Audio((0.3 * rng.standard_normal(rate)).astype(np.float32), rate)


def _blob_count(store) -> int:
    with store.db.read() as conn:
        return conn.execute(text("SELECT count(*) FROM blobs")).scalar()


def test_stored_audio_is_sample_exact(store):
    audio = _audio()
    voice = store.create(audio, "hello there", "Ann Example")
    assert voice.id.startswith("ann-example-") and check_voice_id(voice.id) == voice.id
    back = store.audio(voice.id)
    assert back.sample_rate == audio.sample_rate and np.array_equal(back.samples, audio.samples)
    assert audio_digest(back.samples, back.sample_rate) == voice.digest == store.get(voice.id).digest
    assert [v.id for v in store.list()] == [voice.id]
    store.delete(voice.id)
    with pytest.raises(VoiceNotFound):
        store.get(voice.id)
    assert _blob_count(store) == 0 and store.usage() == (0, 0)


def _wav(channels: np.ndarray, rate: int, subtype: str) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, channels.T, rate, format="WAV", subtype=subtype)
    return buffer.getvalue()


def test_a_multichannel_upload_keeps_digest_and_speaker_id_but_not_its_channels(store):
    # Issue 21 item 6: an 8-channel upload was stored with all its channels as float (8x the mono).
    rng = np.random.default_rng(9)
    channels = (0.2 * rng.standard_normal((8, 48000))).astype(np.float32)
    upload = load_audio(_wav(channels, 48000, "PCM_16"))
    voice = store.create(upload, "eight channels", "st")
    back = store.audio(voice.id)
    assert audio_digest(back.samples, back.sample_rate) == audio_digest(upload.samples, 48000) == voice.digest
    assert clone_speaker_id("eight channels", back.as_loaded()) == clone_speaker_id("eight channels", upload.as_loaded())
    kept = store.usage()[1]
    assert kept < 48000 * 4 + 20_000 < upload.as_loaded().nbytes / 6   # about one float channel, not eight


@pytest.mark.parametrize("shape", [(2, 400), (3, 999), (2, 1000), (1, 1500)])
def test_short_or_small_uploads_keep_their_speaker_id(store, shape):
    rng = np.random.default_rng(shape[1])
    channels = (0.2 * rng.standard_normal(shape)).astype(np.float32)
    upload = load_audio(_wav(channels, 16000, "FLOAT"))
    back = store.audio(store.create(upload, "short", "s").id)
    assert clone_speaker_id("short", back.as_loaded()) == clone_speaker_id("short", upload.as_loaded())
    assert np.array_equal(back.samples, upload.samples)


def test_a_16_bit_mono_upload_is_stored_as_flac(store):
    samples = np.round(np.random.default_rng(1).standard_normal(32000) * 3000).astype(np.int16)
    upload = load_audio(_wav(samples[None, :], 16000, "PCM_16"))
    voice = store.create(upload, "sixteen bits", "f")
    packed = store.stored_audio(voice.id)
    assert sf.info(io.BytesIO(packed.data)).format == "FLAC" and packed.speaker is None
    assert len(packed.data) < 64000
    assert audio_digest(*(lambda a: (a.samples, a.sample_rate))(store.audio(voice.id))) == voice.digest


@pytest.mark.parametrize("bad", ["../etc", "a/b", "UPPER", "", "x" * 65, "-lead", "a.b", "abc\n", "abc\n\n"])
def test_ids_are_checked_with_fullmatch(store, bad):
    # Issue 21 item 8: re.match with ^...$ accepted a trailing newline.
    with pytest.raises(VoiceNotFound):
        store.get(bad)
    with pytest.raises(VoiceNotFound):
        store.delete(bad)
    with pytest.raises(VoiceNotFound):
        store.create(_audio(), "t", voice_id=bad)


def test_quotas_refuse_with_the_setting_named(database_url):
    db = Database(database_url)
    db.migrate()
    one = VoiceStore(db, max_count=1)
    first = one.create(_audio(1), "one", "one")
    with pytest.raises(VoiceQuotaExceeded, match="voice_max_count"):
        one.create(_audio(2), "two", "two")
    with pytest.raises(VoiceQuotaExceeded, match="voice_max_count"):
        one.check_quota()
    one.delete(first.id)
    one.create(_audio(2), "two", "two")
    small = VoiceStore(db, max_bytes=one.usage()[1] + 1000)
    with pytest.raises(VoiceQuotaExceeded, match="voice_max_bytes"):
        small.create(_audio(3), "three", "three")
    assert small.usage()[0] == 1
    db.close()


def test_prompt_entries_travel_with_the_voice_and_blobs_are_shared(store):
    audio = _audio(4)
    digest = audio_digest(audio.samples, audio.sample_rate)
    codes = np.arange(12, dtype=np.int64).reshape(3, 4)
    prompts = (PromptEntry("tokens", "tok@abc/v1", digest, {"n": 12}, {"codes": codes}, 0.7),
               PromptEntry("tokens", "tok@abc/v1", "0" * 64, {"n": 1}, {}, 0.1))   # another clip: skipped
    first = store.create(audio, "shared clip", "a", prompts=prompts)
    second = store.create(audio, "shared clip", "b", prompts=prompts[:1])
    payload, arrays, cost = store.fetch("tokens", "tok@abc/v1", digest)
    assert payload == {"n": 12} and cost == 0.7 and np.array_equal(arrays["codes"], codes)
    assert arrays["codes"].dtype == np.int64
    assert store.fetch("tokens", "tok@abc/v2", digest) is None and store.fetch("tokens", "tok@abc/v1", "1" * 64) is None
    assert [p.namespace for p in store.prompts(first.id)] == ["tok@abc/v1"]
    assert _blob_count(store) == 2          # one audio, one array set, for both voices
    store.delete(first.id)
    assert np.array_equal(store.audio(second.id).samples, audio.samples)
    assert store.fetch("tokens", "tok@abc/v1", digest) is not None
    assert store.add_prompts(second.id, (PromptEntry("tokens", "tok@new/v1", digest, {}, {}, 0.2),)) == 1
    store.delete(second.id)
    assert _blob_count(store) == 0


def test_two_hosts_creating_and_deleting_one_voice(database_url, concurrently):
    hosts = [Database(database_url) for _ in range(2)]
    for db in hosts:
        db.migrate()
    stores = [VoiceStore(db) for db in hosts]
    audio = _audio(5)

    def create(i):
        try:
            return stores[i % 2].create(audio, "same id", voice_id="contested").id
        except VoiceExists:
            return "exists"

    assert sorted(concurrently(create, [(i,) for i in range(8)])) == ["contested"] + ["exists"] * 7

    def delete(i):
        try:
            stores[i % 2].delete("contested")
            return "deleted"
        except VoiceNotFound:
            return "gone"

    assert sorted(concurrently(delete, [(i,) for i in range(8)])) == ["deleted"] + ["gone"] * 7
    # Random ids never collide; concurrent creates of one clip share its audio blob.
    ids = concurrently(lambda i: stores[i % 2].create(audio, "many", "m").id, [(i,) for i in range(8)])
    assert len(set(ids)) == 8 and _blob_count(stores[0]) == 1
    for voice_id in ids:
        stores[1].delete(voice_id)
    assert _blob_count(stores[0]) == 0
    for db in hosts:
        db.close()


def test_old_voice_folders_are_imported_once_and_verified(store, tmp_path):
    root = tmp_path / "cache" / "voices"
    rng = np.random.default_rng(6)
    channels = (0.2 * rng.standard_normal((2, 8000))).astype(np.float32)
    old = load_audio(_wav(channels, 16000, "FLOAT"))
    for voice_id, transcript in (("old-one", "first words"), ("old-two", "second words")):
        folder = root / voice_id
        folder.mkdir(parents=True)
        sf.write(folder / "audio.wav", channels.T, 16000, format="WAV", subtype="FLOAT")   # the old store's form
        (folder / "voice.json").write_text(json.dumps({
            "id": voice_id, "name": voice_id.title(), "transcript": transcript, "digest": old_digest(old),
            "sample_rate": 16000, "duration_s": 0.5, "created_at": 1700000000.0, "namespaces": {"k": "n@1/v1"}}))
    (root / "broken").mkdir()
    (root / "broken" / "voice.json").write_text("{not json")
    (root / ".tmp-half-abcd").mkdir()

    report = import_voice_folders(store, root, lambda audio, digest: (PromptEntry("k", "n@1/v1", digest, {"a": 1}),))
    assert sorted(report.imported) == ["old-one", "old-two"] and list(report.kept) == ["broken"]
    assert sorted(p.name for p in root.iterdir()) == ["broken"]    # verified folders went; .tmp-* too
    voice = store.get("old-one")
    assert (voice.name, voice.transcript, voice.created_at, dict(voice.namespaces)) == \
        ("Old-One", "first words", 1700000000.0, {"k": "n@1/v1"})
    back = store.audio("old-one")
    assert audio_digest(back.samples, back.sample_rate) == old_digest(old) == voice.digest
    assert clone_speaker_id("first words", back.as_loaded()) == clone_speaker_id("first words", old.as_loaded())
    assert store.fetch("k", "n@1/v1", voice.digest) == ({"a": 1}, None, 0.0)

    # Idempotent: a folder whose voice is already stored (a crash before the folder was removed).
    (root / "old-one").mkdir()
    sf.write(root / "old-one" / "audio.wav", channels.T, 16000, format="WAV", subtype="FLOAT")
    (root / "old-one" / "voice.json").write_text(json.dumps({"transcript": "first words", "name": "x"}))
    again = import_voice_folders(store, root)
    assert again.already == ["old-one"] and not (root / "old-one").exists()
    assert len(store.list()) == 2


def old_digest(audio: Audio) -> str:
    return audio_digest(audio.samples, audio.sample_rate)


# ---------------------------------------------------------------------------------------------- bundles


def test_bundle_round_trip_keeps_entries_and_drops_foreign_ones(sqlite_store):
    audio = _audio(1)
    voice = sqlite_store.create(audio, "a transcript", "v")
    tokens = np.arange(12, dtype=np.int64).reshape(3, 4)
    good = BundleEntry("tokens", "tok@abc/v1", voice.digest, {"n": 12}, {"codes": tokens}, 0.7)
    other = BundleEntry("tokens", "tok@abc/v1", "0" * 64, {"n": 1}, {}, 0.1)  # for some other clip
    bundle = read_bundle(export_bundle(sqlite_store, voice.id, [good, other], "Test engine", KEY), key=KEY)
    assert bundle.signed and bundle.trust == ""
    assert bundle.transcript == "a transcript" and bundle.engine == "Test engine"
    assert np.array_equal(bundle.audio.samples, audio.samples)
    assert len(bundle.entries) == 1
    entry = bundle.entries[0]
    assert (entry.kind, entry.namespace, entry.digest, dict(entry.payload), entry.cost_s) == \
        ("tokens", "tok@abc/v1", voice.digest, {"n": 12}, 0.7)
    assert entry.arrays["codes"].dtype == np.int64 and np.array_equal(entry.arrays["codes"], tokens)


def test_a_multichannel_voice_bundle_keeps_its_speaker_id(sqlite_store):
    channels = (0.2 * np.random.default_rng(8).standard_normal((4, 24000))).astype(np.float32)
    upload = load_audio(_wav(channels, 24000, "FLOAT"))
    voice = sqlite_store.create(upload, "four", "q")
    members = _members(export_bundle(sqlite_store, voice.id, [], "e", KEY))
    assert set(members) == {"voice.json", "audio.wav", "speaker.npy"}
    bundle = read_bundle(_zip(members), key=KEY)
    assert bundle.signed and audio_digest(bundle.audio.samples, 24000) == voice.digest
    assert clone_speaker_id("four", bundle.audio.as_loaded()) == clone_speaker_id("four", upload.as_loaded())
    swapped = np.zeros((2, 1000), np.float32)
    npy = io.BytesIO()
    np.save(npy, swapped)
    assert "speaker.npy does not match" in read_bundle(_zip({**members, "speaker.npy": npy.getvalue()}), key=KEY).trust


def _members(bundle: bytes) -> dict[str, bytes]:
    source = zipfile.ZipFile(io.BytesIO(bundle))
    return {name: source.read(name) for name in source.namelist()}


def _zip(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return out.getvalue()


def test_only_a_bundle_signed_with_this_key_and_unchanged_gives_entries(sqlite_store):
    voice = sqlite_store.create(_audio(7), "signed words", "s")
    codes = np.arange(6, dtype=np.int64)
    entry = BundleEntry("tokens", "tok@abc/v1", voice.digest, {"n": 6}, {"codes": codes}, 0.5)
    signed = export_bundle(sqlite_store, voice.id, [entry], "e", KEY)
    assert len(read_bundle(signed, key=KEY).entries) == 1

    unsigned = read_bundle(export_bundle(sqlite_store, voice.id, [entry], "e"), key=KEY)
    assert (unsigned.entries, unsigned.signed, unsigned.trust) == ((), False, "the bundle is not signed")
    no_key = read_bundle(signed)  # a server without bundle_key trusts no entry
    assert no_key.entries == () and "no bundle_key" in no_key.trust
    other_key = read_bundle(signed, key="another secret of 32 characters")
    assert other_key.entries == () and other_key.trust == "the bundle is signed with another key"
    assert np.array_equal(other_key.audio.samples, read_bundle(signed, key=KEY).audio.samples)

    members = _members(signed)
    meta = json.loads(members["voice.json"])
    forged = dict(meta, entries=[dict(meta["entries"][0], cost_s=1e6)])  # "seconds saved" inflated
    tampered = read_bundle(_zip({**members, "voice.json": json.dumps(forged).encode()}), key=KEY)
    assert tampered.entries == () and "changed after signing" in tampered.trust
    other_codes = io.BytesIO()
    np.save(other_codes, np.arange(6, dtype=np.int64)[::-1].copy())
    swapped = read_bundle(_zip({**members, "entries/0/codes.npy": other_codes.getvalue()}), key=KEY)
    assert swapped.entries == () and "entries/0/codes.npy does not match" in swapped.trust

    # The MAC is HMAC-SHA256 under the documented context over voice.json without its signature:
    # recomputed here independently, a bundle re-signed with the key verifies again.
    body = json.dumps({k: v for k, v in forged.items() if k != "signature"}, sort_keys=True,
                      separators=(",", ":")).encode()
    forged["signature"] = dict(meta["signature"], mac=hmac.new(
        KEY.encode(), b"step-audio-studio voice bundle v2\n" + body, hashlib.sha256).hexdigest())
    resigned = read_bundle(_zip({**members, "voice.json": json.dumps(forged).encode()}), key=KEY)
    assert resigned.signed and resigned.entries[0].cost_s == 1e6


def test_bad_bundles_are_refused(sqlite_store):
    voice = sqlite_store.create(_audio(2), "t", "v")
    valid = export_bundle(sqlite_store, voice.id, [], "e")
    members = {n: zipfile.ZipFile(io.BytesIO(valid)).read(n) for n in ("voice.json", "audio.wav")}

    with pytest.raises(InputError, match="not a zip"):
        read_bundle(b"PK\x03\x04 broken")
    with pytest.raises(InputError, match="unexpected files"):
        read_bundle(_zip({**members, "run.py": b"print(1)"}))
    with pytest.raises(InputError, match="unexpected files"):
        read_bundle(_zip({**members, "voice.json\n": b"{}"}))
    with pytest.raises(InputError, match="format"):
        read_bundle(_zip({**members, "voice.json": json.dumps({"format": 99}).encode()}))
    with pytest.raises(InputError, match="unpacks to more than"):
        read_bundle(_zip({**members, "entries/0/big.npy": b"\0" * (257 * 1024**2)}))
    with pytest.raises(InputError, match="limit is 0.5 s"):
        read_bundle(valid, max_seconds=0.5)

    # A pickled object array is never loaded: the entry is dropped, the voice itself still reads.
    meta = json.loads(members["voice.json"])
    meta["entries"] = [{"kind": "tokens", "namespace": "n@1/v1", "digest": voice.digest, "payload": {},
                        "arrays": ["evil"]}]
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    bundle = read_bundle(_zip({**members, "voice.json": json.dumps(meta).encode(),
                               "entries/0/evil.npy": pickled.getvalue()}))
    assert bundle.entries == ()


def test_a_small_bundle_declaring_huge_audio_is_refused_before_reading_it(sqlite_store):
    # Issue 21 item 6: a 249 KiB bundle added 250 MiB of RSS (its audio.wav was read whole first).
    voice = sqlite_store.create(_audio(2), "t", "v")
    members = _members(export_bundle(sqlite_store, voice.id, [], "e"))
    header = io.BytesIO()
    sf.write(header, np.zeros(16, np.float32), 16000, format="WAV", subtype="FLOAT")
    bomb = _zip({**members, "audio.wav": header.getvalue() + b"\0" * (250 * 1024**2)})
    assert len(bomb) < 300 * 1024
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match="audio.wav unpacks to"):
            read_bundle(bomb, max_audio_bytes=20 * 1024**2)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024**2, f"refusing the bundle took {peak / 1024**2:.0f} MiB"
    long_header = io.BytesIO()    # a header that declares 10 minutes: refused from the header alone
    sf.write(long_header, np.zeros(16000 * 600, np.int16), 16000, format="WAV", subtype="PCM_16")
    with pytest.raises(InputError, match="600.0 s long"):
        read_bundle(_zip({**members, "audio.wav": long_header.getvalue()}), max_seconds=30)


def test_damaged_or_odd_bundles_are_refused_with_a_reason(sqlite_store):
    voice = sqlite_store.create(_audio(3), "t", "v")
    valid = export_bundle(sqlite_store, voice.id, [], "e")
    members = {n: zipfile.ZipFile(io.BytesIO(valid)).read(n) for n in ("voice.json", "audio.wav")}
    meta = json.loads(members["voice.json"])

    damaged = bytearray(valid)
    start = damaged.find(b"audio.wav") + 40
    damaged[start:start + 64] = bytes(b ^ 0xFF for b in damaged[start:start + 64])
    with pytest.raises(InputError, match="damaged|not decodable"):
        read_bundle(bytes(damaged))
    with pytest.raises(InputError, match="entries are not a list"):
        read_bundle(_zip({**members, "voice.json": json.dumps({**meta, "entries": 5}).encode()}))
    nan_wav = io.BytesIO()
    sf.write(nan_wav, np.full(1000, np.nan, np.float32), 16000, format="WAV", subtype="FLOAT")
    with pytest.raises(InputError, match="NaN"):
        read_bundle(_zip({**members, "audio.wav": nan_wav.getvalue()}))
    # A truncated .npy in a signed bundle drops its entry; the voice still reads.
    entry = BundleEntry("tokens", "n@1/v1", voice.digest, {}, {"codes": np.arange(100, dtype=np.int64)})
    signed = _members(export_bundle(sqlite_store, voice.id, [entry], "e", KEY))
    assert len(read_bundle(_zip(signed), key=KEY).entries) == 1
    bundle = read_bundle(_zip({**signed, "entries/0/codes.npy": signed["entries/0/codes.npy"][:90]}), key=KEY)
    assert bundle.entries == () and bundle.transcript == "t"


def test_format_2_bundles_with_all_channels_still_import():
    channels = (0.2 * np.random.default_rng(3).standard_normal((2, 16000))).astype(np.float32)
    audio_bytes = _wav(channels, 16000, "FLOAT")
    meta = {"format": 2, "name": "old", "transcript": "old words", "digest": "", "engine": "e", "entries": [],
            "audio_sha256": hashlib.sha256(audio_bytes).hexdigest()}
    bundle = read_bundle(_zip({"voice.json": json.dumps(meta).encode(), "audio.wav": audio_bytes}))
    assert np.array_equal(bundle.audio.as_loaded(), channels) and bundle.transcript == "old words"
