"""Stored voices in the user-data database: a prompt clip, its transcript and its prompt entries.

Owns: voice ids (made here as ``[a-z0-9-]``, never from a caller's path; every id a caller gives
is checked with ``VOICE_ID.fullmatch`` before it reaches a query), the :class:`Voice` record,
creating, reading, listing and deleting voices, the voice quotas (count and bytes), the prompt-cache
entries stored with each voice (:class:`PromptEntry`) and looking them up by cache key for other
hosts (:meth:`VoiceStore.fetch`, the ``funasr_cache.PromptSource`` the studio installs), and the
one-time import of the old ``<cache_dir>/voices/<id>/`` folders (``userdata.legacy``).
Does not own: what is kept of the clip (``userdata.voice_audio``), the database and its transactions
(``userdata.db``), computing prompt entries (the engine), bundles (``web.voices``).

Durability: a voice is created in one transaction (blobs, voice row, prompt rows) and deleted in
one (rows, then the blobs no other row uses), so a crash or kill -9 at any point leaves the voice
either whole or absent; nothing is left to clean. Two hosts creating, deleting or cloning the same
voice at once: one create wins an id (the other gets :class:`VoiceExists`, or a fresh random id when
it asked for none), one delete wins (the other gets :class:`VoiceNotFound`), and a clone that read
the voice before the delete finishes with what it read.
"""

from __future__ import annotations

import io
import json
import logging
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Mapping

import numpy as np
from sqlalchemy import delete, func, select, text
from sqlalchemy.exc import IntegrityError

from core.audio_io import Audio
from core.errors import InputError, StudioError
from funasr_cache.store import PromptEntry, audio_digest
from userdata import blobs
from userdata.db import Database, first_row
from userdata.schema import blobs as blobs_table
from userdata.schema import voice_prompts, voices
from userdata.voice_audio import PackedAudio, pack_audio, unpack_audio

log = logging.getLogger(__name__)

VOICE_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")   # use fullmatch: match() would accept "id\n"
_CREATE_LOCK_ID = 0x57_55_56_43   # pg_advisory_xact_lock key for voice creates ("WUVC")
_CREATE_TRIES = 3   # PostgreSQL: a concurrent transaction inserted the same blob or id first


class VoiceNotFound(InputError):
    """No stored voice has this id (the HTTP API answers 404)."""


class VoiceExists(InputError):
    """A voice with this id exists already (409)."""


class VoiceQuotaExceeded(InputError):
    """Storing the voice would exceed ``voice_max_count`` or ``voice_max_bytes`` (409)."""


@dataclass(frozen=True)
class Voice:
    """One stored voice (what the API shows)."""

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


def check_voice_id(voice_id: str) -> str:
    """Return ``voice_id`` if it is a well-formed id, else raise :class:`VoiceNotFound`."""
    if not isinstance(voice_id, str) or not VOICE_ID.fullmatch(voice_id):
        raise VoiceNotFound(f"no voice with id {voice_id!r} (ids are lowercase letters, digits and '-')")
    return voice_id


def _slug(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug[:40].strip("-")


def _pack_arrays(arrays: Mapping[str, np.ndarray]) -> bytes | None:
    if not arrays:
        return None
    buffer = io.BytesIO()
    np.savez(buffer, **{name: np.asarray(array) for name, array in arrays.items()})
    return buffer.getvalue()


def _unpack_arrays(data: bytes | None) -> dict[str, np.ndarray]:
    if data is None:
        return {}
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


class VoiceStore:
    """The voices of one database. Thread-safe; any number of processes and hosts may share it.

    Parameters:
        db: the user-data database (schema upgraded).
        max_count, max_bytes: the quotas (``settings.voice_max_count`` / ``voice_max_bytes``).
    """

    def __init__(self, db: Database, max_count: int = 1000, max_bytes: int = 1024**3) -> None:
        self.db = db
        self.max_count, self.max_bytes = int(max_count), int(max_bytes)

    def new_id(self, name: str = "") -> str:
        """A fresh id: the name's slug (if any) and a random suffix."""
        slug = _slug(name)
        return f"{slug}-{secrets.token_hex(4)}" if slug else f"voice-{secrets.token_hex(6)}"

    # ------------------------------------------------------------------ writes

    def create(self, audio: Audio, transcript: str, name: str = "", namespaces: Mapping[str, str] | None = None,
               voice_id: str | None = None, prompts: tuple[PromptEntry, ...] = (),
               created_at: float | None = None) -> Voice:
        """Store a voice (and the prompt entries computed for its clip) in one transaction.

        Parameters:
            audio: the prompt clip as decoded (what is kept of it: ``userdata.voice_audio``).
            transcript: what the clip says.
            name: display name (defaults to the id).
            namespaces: kind -> cache namespace the clip was prepared under.
            voice_id: a given id (e.g. an imported folder's); default: a fresh one.
            prompts: entries for this clip (others' digests are skipped).
        Raises:
            InputError: empty transcript; VoiceExists; VoiceQuotaExceeded.
            StoreUnavailable: the database cannot be reached.
        """
        if not transcript or not transcript.strip():
            raise InputError("the voice's transcript is empty")
        given = voice_id is not None
        voice_id = check_voice_id(voice_id) if given else self.new_id(name)
        packed = pack_audio(audio)
        digest = audio_digest(audio.samples, audio.sample_rate)
        rows = []
        for prompt in prompts:
            if prompt.digest != digest:
                log.info("prompt entry %s/%s is for another clip; not stored with voice %s", prompt.kind,
                         prompt.namespace, voice_id)
                continue
            rows.append((prompt, _pack_arrays(prompt.arrays),
                         json.dumps(dict(prompt.payload), sort_keys=True, allow_nan=False)))
        nbytes = packed.nbytes + sum(len(arrays or b"") + len(payload) for _, arrays, payload in rows)
        voice = Voice(id=voice_id, name=(name or voice_id).strip()[:200] or voice_id, transcript=transcript,
                      digest=digest, sample_rate=audio.sample_rate, duration_s=round(audio.duration, 3),
                      created_at=time.time() if created_at is None else created_at,
                      namespaces=dict(namespaces or {}))
        for attempt in range(_CREATE_TRIES):
            try:
                with self.db.write() as conn:
                    self._insert(conn, voice, packed, rows, nbytes)
                break
            except IntegrityError:
                # PostgreSQL: another transaction committed the same id or blob between our check and
                # our insert. The id check above then answers; a random id just gets another suffix.
                if attempt == _CREATE_TRIES - 1:
                    raise StudioError(f"voice {voice_id!r} could not be stored (concurrent writes); try again") from None
                if not given:
                    voice = Voice(**{**voice.to_json(), "id": self.new_id(name)})
        log.info("voice %s stored (%.2f s, %d channel(s) uploaded, %d bytes kept, %d prompt entries, digest %s)",
                 voice.id, audio.duration, packed.channels, nbytes, len(rows), voice.digest[:12])
        return voice

    def _insert(self, conn, voice: Voice, packed, rows, nbytes: int) -> None:
        if conn.dialect.name == "postgresql":
            # Creates from all hosts take turns, so the quota counts every voice exactly (SQLite's
            # BEGIN IMMEDIATE already serializes writers).
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _CREATE_LOCK_ID})
        if conn.execute(select(voices.c.id).where(voices.c.id == voice.id)).first() is not None:
            raise VoiceExists(f"a voice with id {voice.id!r} already exists")
        count, used = conn.execute(select(func.count(), func.coalesce(func.sum(voices.c.nbytes), 0))).one()
        if count + 1 > self.max_count:
            raise VoiceQuotaExceeded(f"the studio already stores {count} voices, its limit (setting voice_max_count); "
                                     "delete one first")
        if used + nbytes > self.max_bytes:
            raise VoiceQuotaExceeded(f"this voice needs {nbytes:,} bytes and stored voices use {used:,} of "
                                     f"{self.max_bytes:,} (setting voice_max_bytes); delete one first")
        audio_ref = blobs.put(conn, packed.data)
        speaker_ref = blobs.put(conn, packed.speaker) if packed.speaker is not None else None
        conn.execute(voices.insert().values(
            id=voice.id, name=voice.name, transcript=voice.transcript, digest=voice.digest,
            sample_rate=voice.sample_rate, duration_s=voice.duration_s, source_channels=packed.channels,
            created_at=voice.created_at, audio_sha256=audio_ref, speaker_sha256=speaker_ref,
            namespaces=json.dumps(dict(voice.namespaces), sort_keys=True), nbytes=nbytes))
        for prompt, arrays, payload in rows:
            conn.execute(voice_prompts.insert().values(
                voice_id=voice.id, kind=prompt.kind, namespace=prompt.namespace, digest=prompt.digest,
                payload=payload, cost_s=float(prompt.cost_s),
                arrays_sha256=blobs.put(conn, arrays) if arrays is not None else None))

    def delete(self, voice_id: str) -> None:
        """Delete a voice, its prompt rows and the blobs nothing else uses, in one transaction.

        Raises:
            VoiceNotFound: there is no such voice (also when a concurrent delete won).
            StoreUnavailable: the database cannot be reached.
        """
        check_voice_id(voice_id)
        for attempt in range(_CREATE_TRIES):
            try:
                released = self._delete(voice_id)
                break
            except IntegrityError:
                # PostgreSQL: a concurrent create began to use one of the blobs we released; retry.
                if attempt == _CREATE_TRIES - 1:
                    raise StudioError(f"voice {voice_id!r} could not be deleted (concurrent writes); try again") from None
        log.info("voice %s deleted (%d blobs released)", voice_id, released)

    def _delete(self, voice_id: str) -> int:
        with self.db.write() as conn:
            # FOR UPDATE (PostgreSQL): a concurrent delete of the same voice waits here, then finds
            # no row; SQLite's BEGIN IMMEDIATE already made it wait.
            row = conn.execute(select(voices.c.audio_sha256, voices.c.speaker_sha256)
                               .where(voices.c.id == voice_id).with_for_update()).first()
            if row is None:
                raise VoiceNotFound(f"no voice with id {voice_id!r}")
            refs = [row.audio_sha256, row.speaker_sha256]
            refs += [r for (r,) in conn.execute(select(voice_prompts.c.arrays_sha256)
                                                .where(voice_prompts.c.voice_id == voice_id))]
            conn.execute(delete(voice_prompts).where(voice_prompts.c.voice_id == voice_id))
            if conn.execute(delete(voices).where(voices.c.id == voice_id)).rowcount != 1:
                raise VoiceNotFound(f"no voice with id {voice_id!r}")   # another host deleted it first
            return blobs.release(conn, refs)

    def add_prompts(self, voice_id: str, prompts: tuple[PromptEntry, ...]) -> int:
        """Store entries for a voice's clip that it does not have yet (e.g. under a new model's
        namespace); returns how many were added. Quota-free: they replace what a model change
        made stale, and are bounded by the kinds an engine has."""
        check_voice_id(voice_id)
        added = 0
        with self.db.write() as conn:
            row = conn.execute(select(voices.c.digest).where(voices.c.id == voice_id)).first()
            if row is None:
                return 0
            have = {(k, n) for k, n in conn.execute(select(voice_prompts.c.kind, voice_prompts.c.namespace)
                                                    .where(voice_prompts.c.voice_id == voice_id))}
            for prompt in prompts:
                if prompt.digest != row.digest or (prompt.kind, prompt.namespace) in have:
                    continue
                arrays = _pack_arrays(prompt.arrays)
                conn.execute(voice_prompts.insert().values(
                    voice_id=voice_id, kind=prompt.kind, namespace=prompt.namespace, digest=prompt.digest,
                    payload=json.dumps(dict(prompt.payload), sort_keys=True, allow_nan=False),
                    cost_s=float(prompt.cost_s), arrays_sha256=blobs.put(conn, arrays) if arrays else None))
                added += 1
        return added

    # ------------------------------------------------------------------ reads

    def get(self, voice_id: str) -> Voice:
        """Raises VoiceNotFound, StoreUnavailable."""
        check_voice_id(voice_id)
        with self.db.read(snapshot=False) as conn:
            row = conn.execute(select(voices).where(voices.c.id == voice_id)).first()
        if row is None:
            raise VoiceNotFound(f"no voice with id {voice_id!r}")
        return _voice(row)

    def audio(self, voice_id: str) -> Audio:
        """The clip the engine gets for this voice (same digest and speaker id as the upload).

        Raises:
            VoiceNotFound: no such voice, or its stored audio is damaged.
        """
        packed = self.stored_audio(voice_id)
        try:
            return unpack_audio(packed.data, packed.speaker, what=f"voice {voice_id!r}'s audio")
        except InputError as exc:
            raise VoiceNotFound(f"voice {voice_id!r} has no readable audio ({exc})") from None

    def stored_audio(self, voice_id: str) -> PackedAudio:
        """The voice's clip as stored (for bundles).

        Raises:
            VoiceNotFound: no such voice, or its stored data is damaged.
        """
        check_voice_id(voice_id)
        audio_blob, speaker_blob = blobs_table.alias("audio_blob"), blobs_table.alias("speaker_blob")
        query = (select(voices.c.audio_sha256, voices.c.speaker_sha256, voices.c.source_channels,
                        audio_blob.c.data.label("audio"), speaker_blob.c.data.label("speaker"))
                 .select_from(voices.outerjoin(audio_blob, audio_blob.c.sha256 == voices.c.audio_sha256)
                              .outerjoin(speaker_blob, speaker_blob.c.sha256 == voices.c.speaker_sha256))
                 .where(voices.c.id == voice_id))
        with self.db.read(snapshot=False) as conn:
            row = first_row(conn, query)
        if row is None:
            raise VoiceNotFound(f"no voice with id {voice_id!r}")
        data = bytes(row.audio) if row.audio is not None else b""
        speaker = bytes(row.speaker) if row.speaker is not None else None
        if blobs.sha256_hex(data) != row.audio_sha256 or \
                (row.speaker_sha256 and (speaker is None or blobs.sha256_hex(speaker) != row.speaker_sha256)):
            log.error("voice %s: its stored audio is damaged (hash mismatch)", voice_id)
            raise VoiceNotFound(f"voice {voice_id!r} has no readable audio (its stored data is damaged)")
        return PackedAudio(data, speaker, int(row.source_channels))

    def list(self) -> list[Voice]:
        with self.db.read() as conn:
            rows = conn.execute(select(voices).order_by(voices.c.created_at, voices.c.id)).all()
        return [_voice(row) for row in rows]

    def check_quota(self) -> None:
        """Refuse early (before any engine work) when no further voice fits; ``create`` checks again,
        exactly, inside its transaction.

        Raises:
            VoiceQuotaExceeded, StoreUnavailable.
        """
        count, used = self.usage()
        if count >= self.max_count:
            raise VoiceQuotaExceeded(f"the studio already stores {count} voices, its limit (setting voice_max_count); "
                                     "delete one first")
        if used >= self.max_bytes:
            raise VoiceQuotaExceeded(f"stored voices use {used:,} of {self.max_bytes:,} bytes (setting voice_max_bytes); "
                                     "delete one first")

    def usage(self) -> tuple[int, int]:
        """(voices stored, bytes they use) -- what the quotas count."""
        with self.db.read() as conn:
            count, used = conn.execute(select(func.count(), func.coalesce(func.sum(voices.c.nbytes), 0))).one()
        return int(count), int(used)

    def known_namespaces(self) -> dict[str, str]:
        """kind -> namespace, as the most recently stored voice was prepared (empty if none)."""
        with self.db.read() as conn:
            row = conn.execute(select(voices.c.namespaces).order_by(voices.c.created_at.desc()).limit(1)).first()
        return json.loads(row[0]) if row else {}

    def prompts(self, voice_id: str) -> tuple[PromptEntry, ...]:
        """The prompt entries stored with a voice (empty when none or no such voice)."""
        check_voice_id(voice_id)
        with self.db.read() as conn:
            rows = conn.execute(select(voice_prompts).where(voice_prompts.c.voice_id == voice_id)
                                .order_by(voice_prompts.c.kind, voice_prompts.c.namespace)).all()
            return tuple(_prompt(conn, row) for row in rows)

    def fetch(self, kind: str, namespace: str, digest: str):
        """``(payload, arrays, cost_s)`` of a stored voice's entry for this cache key, or None: the
        ``funasr_cache.PromptSource`` that fills a local cache miss from the database.

        Raises:
            StoreUnavailable: the database cannot be reached (the cache then computes as usual).
        """
        query = (select(voice_prompts, blobs_table.c.data)
                 .select_from(voice_prompts.outerjoin(blobs_table, blobs_table.c.sha256 == voice_prompts.c.arrays_sha256))
                 .where(voice_prompts.c.kind == kind, voice_prompts.c.namespace == namespace,
                        voice_prompts.c.digest == digest).limit(1))
        with self.db.read(snapshot=False) as conn:    # one statement: no BEGIN/ROLLBACK on PostgreSQL
            row = first_row(conn, query)
        if row is None:
            return None
        try:
            data = bytes(row.data) if row.arrays_sha256 else None
            if data is not None and blobs.sha256_hex(data) != row.arrays_sha256:
                raise blobs.BlobCorrupt(f"stored data {row.arrays_sha256[:12]} is damaged")
            prompt = PromptEntry(row.kind, row.namespace, row.digest, json.loads(row.payload), _unpack_arrays(data),
                                  float(row.cost_s))
        except (KeyError, ValueError, OSError, TypeError, blobs.BlobCorrupt) as exc:
            log.warning("stored prompt entry %s/%s %s is unreadable (%s); it will be computed", kind, namespace,
                        digest[:12], exc)
            return None
        return dict(prompt.payload), dict(prompt.arrays) or None, prompt.cost_s


    def check(self) -> list[str]:
        """Problems found (empty when consistent): blobs no row uses, voices whose audio does not
        read back to their digest. Reads everything; for tests and operators, not for requests."""
        problems = []
        with self.db.read() as conn:
            problems += [f"blob {digest[:12]} is not used by any row" for digest in blobs.unreferenced(conn)]
            ids = [voice_id for (voice_id,) in conn.execute(select(voices.c.id))]
        for voice_id in ids:
            try:
                audio, voice = self.audio(voice_id), self.get(voice_id)
            except VoiceNotFound as exc:
                problems.append(str(exc))
                continue
            if audio_digest(audio.samples, audio.sample_rate) != voice.digest:
                problems.append(f"voice {voice_id}'s audio does not match its digest")
        return problems


    def offer(self, kind: str, namespace: str, digest: str, payload: Mapping, arrays: Mapping, cost_s: float) -> int:
        """Keep a computed prompt entry with every stored voice of this clip that lacks it (e.g.
        after a model change, the new namespace's entries), so other hosts fill it from here.
        One indexed read when no voice has the clip. Returns how many voices took it."""
        with self.db.read(snapshot=False) as conn:
            ids = [voice_id for (voice_id,) in conn.execute(select(voices.c.id).where(voices.c.digest == digest))]
        prompt = PromptEntry(kind, namespace, digest, dict(payload), dict(arrays), float(cost_s))
        taken = sum(self.add_prompts(voice_id, (prompt,)) for voice_id in ids)
        if taken:
            log.info("kept a new %s entry (%s) with %d stored voice(s) of clip %s", kind, namespace, taken, digest[:12])
        return taken


def _voice(row) -> Voice:
    return Voice(id=row.id, name=row.name, transcript=row.transcript, digest=row.digest,
                 sample_rate=int(row.sample_rate), duration_s=float(row.duration_s),
                 created_at=float(row.created_at), namespaces=json.loads(row.namespaces))


def _prompt(conn, row) -> PromptEntry:
    arrays = _unpack_arrays(blobs.get(conn, row.arrays_sha256)) if row.arrays_sha256 else {}
    return PromptEntry(row.kind, row.namespace, row.digest, json.loads(row.payload), arrays, float(row.cost_s))
