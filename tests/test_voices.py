"""web.voices: the voice folder and the portable bundle, without a server.

Covers: sample-exact storage (the cache digest survives a round trip; a stereo clip keeps its
channels), id checks that keep caller strings out of paths, export/read of entries with their
arrays, entries for other audio dropped, signed bundles (entries only with the right key and
untouched files), and refusal of malformed, oversized or pickled bundles.
"""

import hashlib
import hmac
import io
import json
import zipfile

import numpy as np
import pytest
import soundfile as sf

from core.audio_io import Audio
from core.errors import InputError, StudioError
from funasr_cache.store import audio_digest
from web.voices import BundleEntry, VoiceNotFound, VoiceStore, check_voice_id


@pytest.fixture
def store(tmp_path):
    return VoiceStore(tmp_path / "voices")


def _audio(seed=0, rate=22050):
    rng = np.random.default_rng(seed)
    return Audio((0.3 * rng.standard_normal(rate)).astype(np.float32), rate)


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


@pytest.mark.parametrize("bad", ["../etc", "a/b", "UPPER", "", "x" * 65, "-lead", "a.b"])
def test_ids_from_callers_never_become_paths(store, bad):
    with pytest.raises(VoiceNotFound):
        store.get(bad)
    with pytest.raises(VoiceNotFound):
        store.delete(bad)


KEY = "a deployment secret of 32 chars"


def test_stereo_voice_keeps_its_channels(store):
    rng = np.random.default_rng(9)
    channels = (0.2 * rng.standard_normal((2, 16000))).astype(np.float32)
    audio = Audio(channels.mean(axis=0), 16000, channels=channels)
    voice = store.create(audio, "two channels", "st")
    back = store.audio(voice.id)
    assert np.array_equal(back.as_loaded(), channels) and np.array_equal(back.samples, audio.samples)
    assert audio_digest(back.samples, back.sample_rate) == voice.digest


def test_bundle_round_trip_keeps_entries_and_drops_foreign_ones(store):
    audio = _audio(1)
    voice = store.create(audio, "a transcript", "v")
    tokens = np.arange(12, dtype=np.int64).reshape(3, 4)
    good = BundleEntry("tokens", "tok@abc/v1", voice.digest, {"n": 12}, {"codes": tokens}, 0.7)
    other = BundleEntry("tokens", "tok@abc/v1", "0" * 64, {"n": 1}, {}, 0.1)  # for some other clip
    bundle = VoiceStore.read_bundle(store.export_bundle(voice.id, [good, other], "Test engine", KEY), key=KEY)
    assert bundle.signed and bundle.trust == ""
    assert bundle.transcript == "a transcript" and bundle.engine == "Test engine"
    assert np.array_equal(bundle.audio.samples, audio.samples)
    assert len(bundle.entries) == 1
    entry = bundle.entries[0]
    assert (entry.kind, entry.namespace, entry.digest, dict(entry.payload), entry.cost_s) == \
        ("tokens", "tok@abc/v1", voice.digest, {"n": 12}, 0.7)
    assert entry.arrays["codes"].dtype == np.int64 and np.array_equal(entry.arrays["codes"], tokens)


def _members(bundle: bytes) -> dict[str, bytes]:
    source = zipfile.ZipFile(io.BytesIO(bundle))
    return {name: source.read(name) for name in source.namelist()}


def test_only_a_bundle_signed_with_this_key_and_unchanged_gives_entries(store):
    voice = store.create(_audio(7), "signed words", "s")
    codes = np.arange(6, dtype=np.int64)
    entry = BundleEntry("tokens", "tok@abc/v1", voice.digest, {"n": 6}, {"codes": codes}, 0.5)
    signed = store.export_bundle(voice.id, [entry], "e", KEY)
    assert len(VoiceStore.read_bundle(signed, key=KEY).entries) == 1

    unsigned = VoiceStore.read_bundle(store.export_bundle(voice.id, [entry], "e"), key=KEY)
    assert (unsigned.entries, unsigned.signed, unsigned.trust) == ((), False, "the bundle is not signed")
    no_key = VoiceStore.read_bundle(signed)  # a server without bundle_key trusts no entry
    assert no_key.entries == () and "no bundle_key" in no_key.trust
    other_key = VoiceStore.read_bundle(signed, key="another secret of 32 characters")
    assert other_key.entries == () and other_key.trust == "the bundle is signed with another key"
    # The voice itself still reads in every case.
    assert np.array_equal(other_key.audio.samples, VoiceStore.read_bundle(signed, key=KEY).audio.samples)

    members = _members(signed)
    meta = json.loads(members["voice.json"])
    forged = dict(meta, entries=[dict(meta["entries"][0], cost_s=1e6)])  # "seconds saved" inflated
    tampered = VoiceStore.read_bundle(_zip({**members, "voice.json": json.dumps(forged).encode()}), key=KEY)
    assert tampered.entries == () and "changed after signing" in tampered.trust
    other_codes = io.BytesIO()
    np.save(other_codes, np.arange(6, dtype=np.int64)[::-1].copy())
    swapped = VoiceStore.read_bundle(_zip({**members, "entries/0/codes.npy": other_codes.getvalue()}), key=KEY)
    assert swapped.entries == () and "entries/0/codes.npy does not match" in swapped.trust

    # The MAC is HMAC-SHA256 under the documented context over voice.json without its signature:
    # recomputed here independently, a bundle re-signed with the key verifies again.
    body = json.dumps({k: v for k, v in forged.items() if k != "signature"}, sort_keys=True,
                      separators=(",", ":")).encode()
    forged["signature"] = dict(meta["signature"], mac=hmac.new(
        KEY.encode(), b"step-audio-studio voice bundle v2\n" + body, hashlib.sha256).hexdigest())
    resigned = VoiceStore.read_bundle(_zip({**members, "voice.json": json.dumps(forged).encode()}), key=KEY)
    assert resigned.signed and resigned.entries[0].cost_s == 1e6


def _zip(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return out.getvalue()


def test_bad_bundles_are_refused(store):
    voice = store.create(_audio(2), "t", "v")
    valid = store.export_bundle(voice.id, [], "e")
    members = {n: zipfile.ZipFile(io.BytesIO(valid)).read(n) for n in ("voice.json", "audio.wav")}

    with pytest.raises(InputError, match="not a zip"):
        VoiceStore.read_bundle(b"PK\x03\x04 broken")
    with pytest.raises(InputError, match="unexpected files"):
        VoiceStore.read_bundle(_zip({**members, "run.py": b"print(1)"}))
    with pytest.raises(InputError, match="format"):
        VoiceStore.read_bundle(_zip({**members, "voice.json": json.dumps({"format": 99}).encode()}))
    with pytest.raises(InputError, match="unpacks to more than"):
        VoiceStore.read_bundle(_zip({**members, "entries/0/big.npy": b"\0" * (257 * 1024**2)}))
    with pytest.raises(InputError, match="limit is 0.5 s"):
        VoiceStore.read_bundle(valid, max_seconds=0.5)

    # A pickled object array is never loaded: the entry is dropped, the voice itself still reads.
    meta = json.loads(members["voice.json"])
    meta["entries"] = [{"kind": "tokens", "namespace": "n@1/v1", "digest": voice.digest, "payload": {},
                        "arrays": ["evil"]}]
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    bundle = VoiceStore.read_bundle(_zip({**members, "voice.json": json.dumps(meta).encode(),
                                          "entries/0/evil.npy": pickled.getvalue()}))
    assert bundle.entries == ()


def test_damaged_or_odd_bundles_are_refused_with_a_reason(store):
    voice = store.create(_audio(3), "t", "v")
    valid = store.export_bundle(voice.id, [], "e")
    members = {n: zipfile.ZipFile(io.BytesIO(valid)).read(n) for n in ("voice.json", "audio.wav")}
    meta = json.loads(members["voice.json"])

    # A flipped byte inside a deflated member: zipfile raises zlib.error or a CRC BadZipFile.
    damaged = bytearray(valid)
    start = damaged.find(b"audio.wav") + 40
    damaged[start:start + 64] = bytes(b ^ 0xFF for b in damaged[start:start + 64])
    with pytest.raises(InputError, match="damaged"):
        VoiceStore.read_bundle(bytes(damaged))
    with pytest.raises(InputError, match="entries are not a list"):
        VoiceStore.read_bundle(_zip({**members, "voice.json": json.dumps({**meta, "entries": 5}).encode()}))
    nan_wav = io.BytesIO()
    sf.write(nan_wav, np.full(1000, np.nan, np.float32), 16000, format="WAV", subtype="FLOAT")
    with pytest.raises(InputError, match="NaN"):
        VoiceStore.read_bundle(_zip({**members, "audio.wav": nan_wav.getvalue()}))
    # A truncated .npy in a signed bundle drops its entry; the voice still reads.
    entry = BundleEntry("tokens", "n@1/v1", voice.digest, {}, {"codes": np.arange(100, dtype=np.int64)})
    signed = _members(store.export_bundle(voice.id, [entry], "e", KEY))
    assert len(VoiceStore.read_bundle(_zip(signed), key=KEY).entries) == 1
    bundle = VoiceStore.read_bundle(_zip({**signed, "entries/0/codes.npy": signed["entries/0/codes.npy"][:90]}),
                                    key=KEY)
    assert bundle.entries == () and bundle.transcript == "t"


def test_an_unwritable_voice_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "voices"
    blocker.write_text("a file where the folder should be")  # chmod does not stop root; this does
    with pytest.raises(StudioError, match="could not store the voice"):
        VoiceStore(blocker).create(_audio(4), "t", "v")


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"id": "x"}'])
def test_a_damaged_voice_json_hides_that_voice_only(store, content):
    good = store.create(_audio(5), "fine", "good")
    bad = store.create(_audio(6), "soon damaged", "bad")
    (store.root / bad.id / "voice.json").write_text(content)
    with pytest.raises(VoiceNotFound, match="damaged"):
        store.get(bad.id)
    assert [v.id for v in store.list()] == [good.id]
