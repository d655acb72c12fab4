"""Stored voices: a prompt clip plus its transcript, saved once and cloned from many times.

Owns: the voice folder ``<cache_dir>/voices/<id>/`` (``audio.wav`` + ``voice.json``), voice ids,
and the portable bundle file (a zip) that carries a voice to another server together with the
prompt-cache entries (tokens, features) computed for it and the namespaces they were computed
under (which carry the model fingerprints); signing bundles and checking their signature.
Does not own: which entries a clip has or putting them into the cache (``Engine.export_prompt``
and ``Engine.import_prompt``), the cache itself (``funasr_cache.PromptCache``).

Trust: a bundle's cache entries decide what the model is fed for that voice, so they are used only
when the bundle is signed with this deployment's ``bundle_key`` (HMAC-SHA256 over ``voice.json``,
which records the SHA-256 of ``audio.wav`` and of every array file; compared in constant time).
An unsigned bundle, one signed with another key, or one changed after signing still imports its
voice (audio and transcript are what any upload could send), but :meth:`VoiceStore.read_bundle`
returns no entries, so they are recomputed.

Ids are made here (``[a-z0-9-]``, never from a caller's path) and every id a caller gives is
checked against :data:`VOICE_ID` before it touches the file system.

The audio is stored as 32-bit float WAV at its original rate with all its channels, so reading it
back gives exactly the samples that were prepared -- the cache digest (computed over the decoded
mono mix) matches and later clones hit the cache, and the clone speaker id (over the channels as
decoded) matches a clone from the original upload.

Bundle layout (zip, ``format`` 2; format 1 bundles, which had no signature, still import)::

    voice.json                 {"format": 2, "name", "transcript", "digest", "engine", "audio_sha256",
                                 "entries": [{"kind", "namespace", "digest", "payload", "cost_s",
                                              "arrays": [names], "sha256": {name: hex}}],
                                 "signature": {"alg": "hmac-sha256", "key_id", "mac"}}
    audio.wav                  float32 WAV
    entries/<i>/<name>.npy     the entry's arrays (read with allow_pickle=False)
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import re
import secrets
import shutil
import threading
import time
import zipfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import soundfile as sf

from core.audio_io import Audio, load_audio
from core.errors import InputError, StudioError
from funasr_cache.store import audio_digest
from tts_engine.contract import PromptEntry

log = logging.getLogger(__name__)

VOICE_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
BUNDLE_FORMAT = 2
_READABLE_FORMATS = (1, 2)
_SIGNATURE_CONTEXT = b"step-audio-studio voice bundle v2\n"   # a MAC for this use only
MAX_BUNDLE_MEMBERS = 256
MAX_BUNDLE_UNPACKED = 256 * 1024**2  # a 30 s prompt's entries are a few MB; this stops zip bombs
_MEMBER = re.compile(r"^(voice\.json|audio\.wav|entries/\d{1,3}/[A-Za-z0-9_.-]{1,64}\.npy)$")


class VoiceNotFound(InputError):
    """No stored voice has this id (the HTTP API answers 404)."""


@dataclass(frozen=True)
class Voice:
    """One stored voice, as ``voice.json`` describes it."""

    id: str
    name: str
    transcript: str
    digest: str                      # funasr_cache.audio_digest of the stored samples
    sample_rate: int
    duration_s: float
    created_at: float
    namespaces: Mapping[str, str] = field(default_factory=dict)   # kind -> namespace at preparation

    def to_json(self) -> dict:
        data = asdict(self)
        data["namespaces"] = dict(self.namespaces)
        return data


BundleEntry = PromptEntry   # one prompt-cache entry carried by a bundle


@dataclass(frozen=True)
class Bundle:
    """A parsed voice bundle: what :meth:`VoiceStore.read_bundle` returns. ``entries`` is empty
    unless ``signed`` (the signature verified with this server's key); ``trust`` says why not."""

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


def check_voice_id(voice_id: str) -> str:
    """Return ``voice_id`` if it is a well-formed id, else raise :class:`VoiceNotFound`."""
    if not isinstance(voice_id, str) or not VOICE_ID.match(voice_id):
        raise VoiceNotFound(f"no voice with id {voice_id!r} (ids are lowercase letters, digits and '-')")
    return voice_id


def _slug(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug[:40].strip("-")


class VoiceStore:
    """Voices under one folder. Thread-safe; several processes may share the folder (writes are atomic)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self._lock = threading.Lock()

    def _dir(self, voice_id: str) -> Path:
        return self.root / check_voice_id(voice_id)

    def new_id(self, name: str = "") -> str:
        """A fresh id: the name's slug (if any) and a random suffix."""
        slug = _slug(name)
        return f"{slug}-{secrets.token_hex(4)}" if slug else f"voice-{secrets.token_hex(6)}"

    def create(self, audio: Audio, transcript: str, name: str = "", namespaces: Mapping[str, str] | None = None,
               voice_id: str | None = None) -> Voice:
        """Store a voice and return it.

        Parameters:
            audio: the prompt clip (any rate; stored losslessly at its rate).
            transcript: what the clip says.
            name: display name (defaults to the id).
            namespaces: kind -> cache namespace the clip was prepared under.
        Raises:
            InputError: empty transcript or a taken id.
            StudioError: the folder cannot be written (full or read-only disk).
        """
        if not transcript or not transcript.strip():
            raise InputError("the voice's transcript is empty")
        voice_id = check_voice_id(voice_id or self.new_id(name))
        voice = Voice(id=voice_id, name=(name or voice_id).strip()[:200], transcript=transcript,
                      digest=audio_digest(audio.samples, audio.sample_rate), sample_rate=audio.sample_rate,
                      duration_s=round(audio.duration, 3), created_at=time.time(), namespaces=dict(namespaces or {}))
        folder = self._dir(voice_id)
        tmp = self.root / f".tmp-{voice_id}-{secrets.token_hex(4)}"
        try:
            tmp.mkdir(parents=True)
            sf.write(tmp / "audio.wav", audio.as_loaded().T, audio.sample_rate, format="WAV", subtype="FLOAT")
            (tmp / "voice.json").write_text(json.dumps(voice.to_json(), sort_keys=True, indent=1))
            with self._lock:
                if folder.exists():
                    raise InputError(f"a voice with id {voice_id!r} already exists")
                tmp.rename(folder)  # publish atomically: a reader sees all of it or nothing
        except (OSError, sf.LibsndfileError) as exc:  # full or read-only disk
            log.error("voice %s could not be stored under %s: %s", voice_id, self.root, exc)
            raise StudioError(f"the server could not store the voice ({exc})") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("voice %s stored (%.2f s, digest %s)", voice_id, audio.duration, voice.digest[:12])
        return voice

    def get(self, voice_id: str) -> Voice:
        path = self._dir(voice_id) / "voice.json"
        try:
            return Voice(**json.loads(path.read_text()))
        except FileNotFoundError:
            raise VoiceNotFound(f"no voice with id {voice_id!r}") from None
        except (OSError, ValueError, TypeError) as exc:  # unreadable, not JSON, or not a voice's fields
            log.warning("voice %s is unreadable: %s", voice_id, exc)
            raise VoiceNotFound(f"voice {voice_id!r} is damaged and cannot be read") from None

    def audio(self, voice_id: str) -> Audio:
        """The stored clip, sample-exact."""
        path = self._dir(voice_id) / "audio.wav"
        try:
            return load_audio(path, what=f"voice {voice_id!r}'s audio")
        except InputError as exc:
            raise VoiceNotFound(f"voice {voice_id!r} has no readable audio ({exc})") from None

    def list(self) -> list[Voice]:
        voices = []
        if not self.root.is_dir():
            return voices
        for folder in sorted(self.root.iterdir()):
            if folder.is_dir() and VOICE_ID.match(folder.name):
                try:
                    voices.append(self.get(folder.name))
                except VoiceNotFound:
                    continue
        return sorted(voices, key=lambda v: v.created_at)

    def delete(self, voice_id: str) -> None:
        folder = self._dir(voice_id)
        if not (folder / "voice.json").is_file():
            raise VoiceNotFound(f"no voice with id {voice_id!r}")
        shutil.rmtree(folder, ignore_errors=True)
        log.info("voice %s deleted", voice_id)

    def known_namespaces(self) -> dict[str, str]:
        """kind -> namespace, as the most recently stored voice was prepared (empty if none)."""
        voices = self.list()
        return dict(voices[-1].namespaces) if voices else {}

    # ------------------------------------------------------------------ bundles

    def export_bundle(self, voice_id: str, entries: list[BundleEntry], engine: str, key: str = "") -> bytes:
        """The voice as a portable zip holding its audio, transcript and ``entries``; signed with
        ``key`` when one is given (see the module docstring)."""
        voice = self.get(voice_id)
        audio_bytes = (self._dir(voice_id) / "audio.wav").read_bytes()
        meta = {"format": BUNDLE_FORMAT, "name": voice.name, "transcript": voice.transcript,
                "digest": voice.digest, "engine": engine, "entries": [],
                "audio_sha256": hashlib.sha256(audio_bytes).hexdigest()}
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("audio.wav", audio_bytes)
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

    @staticmethod
    def read_bundle(data: bytes, max_seconds: float | None = None, key: str = "") -> Bundle:
        """Parse and check a bundle made by :meth:`export_bundle`.

        Its entries are returned only when its signature verifies with ``key`` (else ``entries``
        is empty and ``trust`` says why); entries whose digest does not match the bundle's audio
        are dropped too (they could never be looked up under this audio anyway).

        Raises:
            InputError: not a zip, unknown format, unexpected members, bad JSON or audio.
        """
        try:
            zf = zipfile.ZipFile(io.BytesIO(data))
        except zipfile.BadZipFile:
            raise InputError("the voice bundle is not a zip file "
                             "(export one with GET /v1/audio/voices/{id}/export)") from None
        try:
            with zf:
                return VoiceStore._parse_bundle(zf, max_seconds, key)
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
            # A damaged member (bad CRC, broken deflate stream) or an unsupported compression.
            raise InputError(f"the voice bundle is damaged ({exc})") from None

    @staticmethod
    def _parse_bundle(zf: zipfile.ZipFile, max_seconds: float | None, key: str) -> Bundle:
        """The checks of :meth:`read_bundle` on an opened zip."""
        members = zf.infolist()
        if len(members) > MAX_BUNDLE_MEMBERS:
            raise InputError(f"the voice bundle has {len(members)} files; at most {MAX_BUNDLE_MEMBERS} are allowed")
        if sum(m.file_size for m in members) > MAX_BUNDLE_UNPACKED:
            raise InputError(f"the voice bundle unpacks to more than {MAX_BUNDLE_UNPACKED // 1024**2} MiB")
        names = {m.filename for m in members}
        bad = sorted(n for n in names if not _MEMBER.match(n))
        if bad:
            raise InputError(f"the voice bundle holds unexpected files: {', '.join(bad[:5])}")
        if not {"voice.json", "audio.wav"} <= names:
            raise InputError("the voice bundle lacks voice.json or audio.wav")
        try:
            meta = json.loads(zf.read("voice.json"))
        except ValueError as exc:
            raise InputError(f"the voice bundle's voice.json is not valid JSON ({exc})") from None
        if not isinstance(meta, dict) or meta.get("format") not in _READABLE_FORMATS:
            found = meta.get("format") if isinstance(meta, dict) else None
            raise InputError(f"unsupported voice bundle format {found!r}; this server reads format {BUNDLE_FORMAT}")
        audio_bytes = zf.read("audio.wav")
        # Bounded like any upload: the header is checked before the samples are decoded.
        audio = load_audio(audio_bytes, max_seconds=max_seconds, what="the voice bundle's audio")
        digest = audio_digest(audio.samples, audio.sample_rate)
        raw_entries = meta.get("entries") or []
        if not isinstance(raw_entries, list):
            raise InputError("the voice bundle's entries are not a list")
        transcript = meta.get("transcript")
        if not isinstance(transcript, str) or not transcript.strip():
            raise InputError("the voice bundle has no transcript")
        trust = _verify(meta, key, audio_bytes, zf, names)
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


def _verify(meta: dict, key: str, audio_bytes: bytes, zf: zipfile.ZipFile, names: set[str]) -> str:
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
    for index, raw in enumerate(meta.get("entries") or []):
        hashes = raw.get("sha256") if isinstance(raw, dict) else None
        for name in (raw.get("arrays") or []) if isinstance(raw, dict) else []:
            member = f"entries/{index}/{name}.npy"
            if not isinstance(hashes, dict) or member not in names \
                    or hashes.get(name) != hashlib.sha256(zf.read(member)).hexdigest():
                return f"{member} does not match the signed hash"
    return ""


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
        try:
            arrays[name] = np.load(io.BytesIO(zf.read(member)), allow_pickle=False)
        except (ValueError, EOFError, OSError):  # not an .npy, truncated, or an object array
            return None
    cost = raw.get("cost_s", 0.0)
    return BundleEntry(kind, namespace, digest, payload, arrays, float(cost) if isinstance(cost, (int, float)) else 0.0)
