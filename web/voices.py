"""The portable voice bundle (a zip) that carries a stored voice to another studio, and its signature.

Owns: the bundle format -- a voice's stored clip and transcript together with the prompt-cache
entries (tokens, features) computed for it and the namespaces they were computed under (which carry
the model fingerprints) -- writing it (:func:`export_bundle`), reading and checking it
(:func:`read_bundle`), signing it and checking the signature. The voice names (``Voice``,
``VoiceStore``, ``VoiceNotFound``, ``check_voice_id``) are re-exported from ``userdata.voices``,
which owns stored voices.
Does not own: storing voices (``userdata.voices``), which entries a clip has or putting them into the
cache (``Engine.export_prompt`` and ``Engine.import_prompt``), the cache itself.

Trust: a bundle's cache entries decide what the model is fed for that voice, so they are used only
when the bundle is signed with this deployment's ``bundle_key`` (HMAC-SHA256 over ``voice.json``,
which records the SHA-256 of ``audio.wav``, of ``speaker.npy`` and of every array file; compared in
constant time). An unsigned bundle, one signed with another key, or one changed after signing
still imports its voice (audio and transcript are what any upload could send), but
:func:`read_bundle` returns no entries, so they are recomputed.

Memory: every member's declared size is checked before it is read (voice.json and speaker.npy 1 MiB,
audio.wav ``max_audio_bytes``, each array 64 MiB; all 256 MiB) and no more than that is ever read
from it; the audio header (channels, rate, length) is checked before its samples are decoded; arrays
are read only from a bundle whose signature verified, each checked against its ``.npy`` header first;
hashes are computed on streams.

Bundle layout (zip, ``format`` 3; formats 1 and 2, whose ``audio.wav`` held every channel, still
import)::

    voice.json                 {"format": 3, "name", "transcript", "digest", "engine", "audio_sha256",
                                 "speaker_sha256" (multi-channel uploads only),
                                 "entries": [{"kind", "namespace", "digest", "payload", "cost_s",
                                              "arrays": [names], "sha256": {name: hex}}],
                                 "signature": {"alg": "hmac-sha256", "key_id", "mac"}}
    audio.wav                  the stored mono clip (float32 WAV, or 16-bit FLAC data; read by content)
    speaker.npy                what the clone speaker id hashes of a multi-channel upload (userdata.voice_audio)
    entries/<i>/<name>.npy     the entry's arrays (read with allow_pickle=False)
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import re
import zipfile
import zlib
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from core.audio_io import Audio, load_audio
from core.errors import InputError
from funasr_cache.store import PromptEntry, audio_digest
from userdata.voice_audio import read_speaker, unpack_audio
from userdata.voices import VOICE_ID, Voice, VoiceExists, VoiceNotFound, VoiceStore, check_voice_id  # noqa: F401

log = logging.getLogger(__name__)

BUNDLE_FORMAT = 3
_READABLE_FORMATS = (1, 2, 3)
_SIGNATURE_CONTEXT = b"step-audio-studio voice bundle v2\n"   # a MAC for this use only
MAX_BUNDLE_MEMBERS = 256
MAX_BUNDLE_UNPACKED = 256 * 1024**2  # a 30 s prompt's entries are a few MB; this stops zip bombs
MAX_META_BYTES = 1024**2             # voice.json, speaker.npy
MAX_ARRAY_BYTES = 64 * 1024**2       # one entry array
DEFAULT_MAX_AUDIO_BYTES = 64 * 1024**2
_MEMBER = re.compile(r"voice\.json|audio\.wav|speaker\.npy|entries/\d{1,3}/[A-Za-z0-9_.-]{1,64}\.npy")

BundleEntry = PromptEntry   # one prompt-cache entry carried by a bundle


@dataclass(frozen=True)
class Bundle:
    """A parsed voice bundle: what :func:`read_bundle` returns. ``entries`` is empty unless
    ``signed`` (the signature verified with this server's key); ``trust`` says why not."""

    name: str
    transcript: str
    audio: Audio
    engine: str
    entries: tuple[BundleEntry, ...]
    signed: bool = False
    trust: str = ""


def _mac(key: str, meta: Mapping) -> str:
    body = {k: v for k, v in meta.items() if k != "signature"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    return hmac.new(key.encode(), _SIGNATURE_CONTEXT + canonical, hashlib.sha256).hexdigest()


def key_id(key: str) -> str:
    """A short public name of a bundle key (reveals nothing about the key itself)."""
    return hmac.new(key.encode(), b"key id", hashlib.sha256).hexdigest()[:8]


def export_bundle(store: VoiceStore, voice_id: str, entries: list[BundleEntry], engine: str, key: str = "") -> bytes:
    """The stored voice as a portable zip holding its clip, transcript and ``entries``; signed with
    ``key`` when one is given (see the module docstring).

    Raises:
        VoiceNotFound, StoreUnavailable: as :meth:`VoiceStore.get`.
    """
    voice = store.get(voice_id)
    packed = store.stored_audio(voice_id)
    meta = {"format": BUNDLE_FORMAT, "name": voice.name, "transcript": voice.transcript,
            "digest": voice.digest, "engine": engine, "entries": [],
            "audio_sha256": hashlib.sha256(packed.data).hexdigest()}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("audio.wav", packed.data)
        if packed.speaker is not None:
            zf.writestr("speaker.npy", packed.speaker)
            meta["speaker_sha256"] = hashlib.sha256(packed.speaker).hexdigest()
        for index, entry in enumerate(entries):
            names, hashes = [], {}
            for name, array in entry.arrays.items():
                array_buffer = io.BytesIO()
                np.save(array_buffer, np.asarray(array), allow_pickle=False)
                zf.writestr(f"entries/{index}/{name}.npy", array_buffer.getvalue())
                names.append(name)
                hashes[name] = hashlib.sha256(array_buffer.getvalue()).hexdigest()
            meta["entries"].append({"kind": entry.kind, "namespace": entry.namespace, "digest": entry.digest,
                                    "payload": dict(entry.payload), "cost_s": entry.cost_s, "arrays": names,
                                    "sha256": hashes})
        if key:
            meta["signature"] = {"alg": "hmac-sha256", "key_id": key_id(key), "mac": _mac(key, meta)}
        zf.writestr("voice.json", json.dumps(meta, sort_keys=True, indent=1))
    return buffer.getvalue()


def read_bundle(data: bytes, max_seconds: float | None = None, key: str = "",
                max_audio_bytes: int = DEFAULT_MAX_AUDIO_BYTES) -> Bundle:
    """Parse and check a bundle made by :func:`export_bundle`.

    Its entries are returned only when its signature verifies with ``key`` (else ``entries``
    is empty and ``trust`` says why); entries whose digest does not match the bundle's audio
    are dropped too (they could never be looked up under this audio anyway).

    Raises:
        InputError: not a zip, unknown format, unexpected or oversized members, bad JSON or audio.
    """
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise InputError("the voice bundle is not a zip file "
                         "(export one with GET /v1/audio/voices/{id}/export)") from None
    try:
        with zf:
            return _parse_bundle(zf, max_seconds, key, max_audio_bytes)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
        # A damaged member (bad CRC, broken deflate stream) or an unsupported compression.
        raise InputError(f"the voice bundle is damaged ({exc})") from None


def _read_member(zf: zipfile.ZipFile, name: str, limit: int) -> bytes:
    """A member's bytes, refused by its declared size before any is read (and never more than
    ``limit`` bytes read, whatever the header says)."""
    info = zf.getinfo(name)
    if info.file_size > limit:
        raise InputError(f"the voice bundle's {name} unpacks to {info.file_size:,} bytes; at most {limit:,} "
                         "are accepted")
    with zf.open(info) as stream:
        data = stream.read(limit + 1)
    if len(data) > limit:
        raise InputError(f"the voice bundle's {name} is larger than it declares")
    return data


def _parse_bundle(zf: zipfile.ZipFile, max_seconds: float | None, key: str, max_audio_bytes: int) -> Bundle:
    """The checks of :func:`read_bundle` on an opened zip."""
    members = zf.infolist()
    if len(members) > MAX_BUNDLE_MEMBERS:
        raise InputError(f"the voice bundle has {len(members)} files; at most {MAX_BUNDLE_MEMBERS} are allowed")
    if sum(m.file_size for m in members) > MAX_BUNDLE_UNPACKED:
        raise InputError(f"the voice bundle unpacks to more than {MAX_BUNDLE_UNPACKED // 1024**2} MiB")
    names = {m.filename for m in members}
    bad = sorted(n for n in names if not _MEMBER.fullmatch(n))
    if bad:
        raise InputError(f"the voice bundle holds unexpected files: {', '.join(bad[:5])}")
    if not {"voice.json", "audio.wav"} <= names:
        raise InputError("the voice bundle lacks voice.json or audio.wav")
    try:
        meta = json.loads(_read_member(zf, "voice.json", MAX_META_BYTES))
    except ValueError as exc:
        raise InputError(f"the voice bundle's voice.json is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") not in _READABLE_FORMATS:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise InputError(f"unsupported voice bundle format {found!r}; this server reads format {BUNDLE_FORMAT}")
    # Sizes as declared are checked before a byte is read; load_audio then checks the audio's header
    # (channels, rate, length) before it decodes the samples.
    audio_bytes = _read_member(zf, "audio.wav", max_audio_bytes)
    speaker = _read_member(zf, "speaker.npy", MAX_META_BYTES) if "speaker.npy" in names else None
    what = "the voice bundle's audio"
    audio = unpack_audio(audio_bytes, speaker, max_seconds, what) if speaker is not None \
        else load_audio(audio_bytes, max_seconds=max_seconds, what=what)
    digest = audio_digest(audio.samples, audio.sample_rate)
    raw_entries = meta.get("entries") or []
    if not isinstance(raw_entries, list):
        raise InputError("the voice bundle's entries are not a list")
    transcript = meta.get("transcript")
    if not isinstance(transcript, str) or not transcript.strip():
        raise InputError("the voice bundle has no transcript")
    trust = _verify(meta, key, audio_bytes, speaker, zf, names)
    entries = []
    for index, raw in enumerate(raw_entries if not trust else []):
        entry = _read_entry(zf, index, raw, names)
        if entry is None or entry.digest != digest:
            log.info("voice bundle entry %d dropped (malformed or for other audio)", index)
            continue
        entries.append(entry)
    if trust and raw_entries:
        log.info("voice bundle entries not used (%s); they will be recomputed", trust)
    return Bundle(name=str(meta.get("name") or "")[:200], transcript=transcript, audio=audio,
                  engine=str(meta.get("engine") or ""), entries=tuple(entries), signed=not trust, trust=trust)


def _sha256_member(zf: zipfile.ZipFile, member: str) -> str:
    """SHA-256 of a member, streamed (never all of it in memory)."""
    digest = hashlib.sha256()
    with zf.open(member) as stream:
        while block := stream.read(1024**2):
            digest.update(block)
    return digest.hexdigest()


def _verify(meta: dict, key: str, audio_bytes: bytes, speaker: bytes | None, zf: zipfile.ZipFile,
            names: set[str]) -> str:
    """"" when ``meta`` is signed with ``key`` and every file matches its recorded SHA-256; else why not."""
    signature = meta.get("signature")
    if not isinstance(signature, dict) or not isinstance(signature.get("mac"), str):
        return "the bundle is not signed"
    if not key:
        return "this server has no bundle_key to check signatures with"
    if signature.get("key_id") != key_id(key):
        return "the bundle is signed with another key"
    try:
        expected = _mac(key, meta)
    except (TypeError, ValueError):   # NaN or non-JSON values: cannot have been signed by us
        return "the bundle's voice.json cannot be canonicalised"
    if not hmac.compare_digest(expected.encode(), signature["mac"].encode()):
        return "the signature does not verify (the bundle was changed after signing)"
    # The MAC covers the recorded hashes; now the files must match them.
    if meta.get("audio_sha256") != hashlib.sha256(audio_bytes).hexdigest():
        return "audio.wav does not match the signed hash"
    if meta.get("speaker_sha256") != (hashlib.sha256(speaker).hexdigest() if speaker is not None else None):
        return "speaker.npy does not match the signed hash"
    for index, raw in enumerate(meta.get("entries") or []):
        hashes = raw.get("sha256") if isinstance(raw, dict) else None
        for name in (raw.get("arrays") or []) if isinstance(raw, dict) else []:
            member = f"entries/{index}/{name}.npy"
            if not isinstance(hashes, dict) or member not in names \
                    or hashes.get(name) != _sha256_member(zf, member):
                return f"{member} does not match the signed hash"
    return ""


def _read_npy(zf: zipfile.ZipFile, member: str) -> np.ndarray | None:
    """An array member, checked against its ``.npy`` header before its data is read; None when it
    is oversized, not an .npy, truncated, or of object dtype (never unpickled)."""
    info = zf.getinfo(member)
    if info.file_size > MAX_ARRAY_BYTES:
        return None
    try:
        with zf.open(info) as stream:
            version = np.lib.format.read_magic(stream)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) \
                else np.lib.format.read_array_header_2_0
            shape, _fortran, dtype = read_header(stream)
            if dtype.hasobject or int(np.prod(shape, dtype=np.int64)) * dtype.itemsize != info.file_size - stream.tell():
                return None
        return np.load(io.BytesIO(_read_member(zf, member, MAX_ARRAY_BYTES)), allow_pickle=False)
    except (ValueError, EOFError, OSError, InputError):
        return None


def _read_entry(zf: zipfile.ZipFile, index: int, raw, names: set[str]) -> BundleEntry | None:
    if not isinstance(raw, dict):
        return None
    kind, namespace, digest = raw.get("kind"), raw.get("namespace"), raw.get("digest")
    payload, array_names = raw.get("payload"), raw.get("arrays") or []
    if not all(isinstance(v, str) and v for v in (kind, namespace, digest)) or not isinstance(payload, dict):
        return None
    arrays = {}
    for name in array_names:
        member = f"entries/{index}/{name}.npy"
        if not isinstance(name, str) or member not in names:
            return None
        array = _read_npy(zf, member)
        if array is None:
            return None
        arrays[name] = array
    cost = raw.get("cost_s", 0.0)
    return BundleEntry(kind, namespace, digest, payload, arrays, float(cost) if isinstance(cost, (int, float)) else 0.0)


__all__ = ["BUNDLE_FORMAT", "Bundle", "BundleEntry", "VOICE_ID", "Voice", "VoiceExists", "VoiceNotFound", "VoiceStore",
           "check_voice_id", "export_bundle", "key_id", "read_bundle", "read_speaker"]
