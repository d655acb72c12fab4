"""Productions, their segments and takes in the user-data database.

Owns: reading and writing the ``productions``, ``segments`` and ``takes`` rows (``userdata.schema``) as
``productions.model`` values; take audio as a blob (``userdata.blobs``: float32 WAV, exact samples);
the rules that keep a production consistent in one transaction each: changing a segment's text, voice or
instructions drops its chosen take (it is pending again, its takes stay), a new take can be chosen as
it is stored, only a take of the segment can be chosen, deleting a production deletes its segments,
takes and the blobs no other row uses.
Does not own: generating takes or rendering (``productions.service``), the connection and migrations
(``userdata.db``), what a voice is (``userdata.voices``).
"""

from __future__ import annotations

import json
import time
from typing import Iterable, Mapping

from sqlalchemy import delete, func, select, update
from sqlalchemy.engine import Connection

from core.errors import InputError
from core.transcript import Word
from productions.model import Production, ProductionNotFound, Segment, Take
from userdata import blobs
from userdata.schema import productions as t_productions
from userdata.schema import segments as t_segments
from userdata.schema import takes as t_takes

EDITABLE = ("text", "voice_id", "instructions", "pause_ms", "speaker")
_REGENERATING = ("text", "voice_id", "instructions")   # a change of these needs a new take


def _take(row) -> Take:
    return Take(id=row.id, segment_id=row.segment_id, created_at=row.created_at, seed=int(row.seed),
                source=row.source, text=row.text, voice_id=row.voice_id, duration_ms=int(row.duration_ms),
                sample_rate=row.sample_rate, audio_sha256=row.audio_sha256, parent_take_id=row.parent_take_id,
                timings=json.loads(row.timings), scores=json.loads(row.scores), note=row.note,
                words=tuple(Word(w["word"], w["start"], w["end"]) for w in json.loads(row.words)))


def _segment(row, takes: tuple[Take, ...]) -> Segment:
    return Segment(id=row.id, production_id=row.production_id, position=row.position, text=row.text,
                   voice_id=row.voice_id, speaker=row.speaker, instructions=row.instructions, pause_ms=row.pause_ms,
                   target_start_ms=row.target_start_ms, target_end_ms=row.target_end_ms, state=row.state,
                   chosen_take_id=row.chosen_take_id, note=row.note, takes=takes)


class ProductionStore:
    """The repository over a ``userdata.db.Database``; thread-safe (each call is its own transaction)."""

    def __init__(self, db) -> None:
        self.db = db

    # ------------------------------------------------------------------ productions

    def create(self, production: Production) -> Production:
        """Store a new production and its segments (their takes must be empty)."""
        with self.db.write() as conn:
            conn.execute(t_productions.insert().values(
                id=production.id, title=production.title, source_kind=production.source_kind,
                fit_to_cue=int(production.fit_to_cue), created_at=production.created_at,
                updated_at=production.updated_at))
            if production.segments:
                conn.execute(t_segments.insert(), [self._segment_row(s) for s in production.segments])
        return self.get(production.id)

    @staticmethod
    def _segment_row(s: Segment) -> dict:
        return {"id": s.id, "production_id": s.production_id, "position": s.position, "speaker": s.speaker,
                "voice_id": s.voice_id, "text": s.text, "instructions": s.instructions, "pause_ms": s.pause_ms,
                "target_start_ms": s.target_start_ms, "target_end_ms": s.target_end_ms, "state": s.state,
                "chosen_take_id": s.chosen_take_id, "note": s.note}

    def list(self) -> list[Production]:
        """Every production, newest first, with its segments but without their takes."""
        with self.db.read() as conn:
            rows = conn.execute(select(t_productions).order_by(t_productions.c.created_at.desc())).all()
            segs = conn.execute(select(t_segments).order_by(t_segments.c.position)).all()
        by_production: dict[str, list] = {}
        for s in segs:
            by_production.setdefault(s.production_id, []).append(_segment(s, ()))
        return [self._production(r, tuple(by_production.get(r.id, ()))) for r in rows]

    @staticmethod
    def _production(row, segments: tuple[Segment, ...]) -> Production:
        return Production(id=row.id, title=row.title, source_kind=row.source_kind, created_at=row.created_at,
                          updated_at=row.updated_at, fit_to_cue=bool(row.fit_to_cue), segments=segments)

    def get(self, production_id: str) -> Production:
        """The production with every segment and take.

        Raises:
            ProductionNotFound: no such production.
        """
        with self.db.read() as conn:
            return self._get(conn, production_id)

    def _get(self, conn: Connection, production_id: str) -> Production:
        row = conn.execute(select(t_productions).where(t_productions.c.id == production_id)).first()
        if row is None:
            raise ProductionNotFound(f"no production {production_id!r}")
        segs = conn.execute(select(t_segments).where(t_segments.c.production_id == production_id)
                            .order_by(t_segments.c.position)).all()
        takes = conn.execute(select(t_takes).join(t_segments, t_takes.c.segment_id == t_segments.c.id)
                             .where(t_segments.c.production_id == production_id)
                             .order_by(t_takes.c.created_at, t_takes.c.id)).all()
        by_segment: dict[str, list[Take]] = {}
        for t in takes:
            by_segment.setdefault(t.segment_id, []).append(_take(t))
        return self._production(row, tuple(_segment(s, tuple(by_segment.get(s.id, ()))) for s in segs))

    def count(self) -> int:
        with self.db.read() as conn:
            return int(conn.execute(select(func.count()).select_from(t_productions)).scalar_one())

    def delete(self, production_id: str) -> None:
        """Delete a production, its segments and takes, and the take audio no other row uses.

        Raises:
            ProductionNotFound: no such production.
        """
        with self.db.write() as conn:
            self._get(conn, production_id)
            seg_ids = select(t_segments.c.id).where(t_segments.c.production_id == production_id)
            digests = [r[0] for r in conn.execute(select(t_takes.c.audio_sha256).where(t_takes.c.segment_id.in_(seg_ids)))]
            conn.execute(delete(t_takes).where(t_takes.c.segment_id.in_(seg_ids)))
            conn.execute(delete(t_segments).where(t_segments.c.production_id == production_id))
            conn.execute(delete(t_productions).where(t_productions.c.id == production_id))
            blobs.release(conn, digests)

    def rename(self, production_id: str, title: str) -> Production:
        with self.db.write() as conn:
            self._get(conn, production_id)
            conn.execute(update(t_productions).where(t_productions.c.id == production_id)
                         .values(title=title, updated_at=time.time()))
        return self.get(production_id)

    # ------------------------------------------------------------------ segments

    def _segment_in(self, conn: Connection, production_id: str, segment_id: str):
        row = conn.execute(select(t_segments).where(t_segments.c.id == segment_id,
                                                    t_segments.c.production_id == production_id)).first()
        if row is None:
            if conn.execute(select(t_productions.c.id).where(t_productions.c.id == production_id)).first() is None:
                raise ProductionNotFound(f"no production {production_id!r}")
            raise ProductionNotFound(f"production {production_id!r} has no segment {segment_id!r}")
        return row

    def update_segment(self, production_id: str, segment_id: str, changes: Mapping[str, object]) -> Segment:
        """Change a segment's ``text``, ``voice_id``, ``instructions``, ``pause_ms`` or ``speaker``. A change
        of text, voice or instructions drops the chosen take (the segment is pending again).

        Raises:
            ProductionNotFound: no such production or segment.
        """
        unknown = set(changes) - set(EDITABLE)
        if unknown:
            raise InputError(f"cannot change {', '.join(sorted(unknown))} of a segment; only {', '.join(EDITABLE)}")
        with self.db.write() as conn:
            row = self._segment_in(conn, production_id, segment_id)
            values = dict(changes)
            if any(k in _REGENERATING and changes[k] != getattr(row, k) for k in changes):
                values.update(chosen_take_id=None, state="pending", note="")
            if values:
                conn.execute(update(t_segments).where(t_segments.c.id == segment_id).values(**values))
                self._touch(conn, production_id)
        return self.segment(production_id, segment_id)

    def segment(self, production_id: str, segment_id: str) -> Segment:
        with self.db.read() as conn:
            row = self._segment_in(conn, production_id, segment_id)
            takes = tuple(_take(t) for t in conn.execute(select(t_takes).where(t_takes.c.segment_id == segment_id)
                                                         .order_by(t_takes.c.created_at, t_takes.c.id)))
        return _segment(row, takes)

    def set_state(self, segment_ids: Iterable[str], state: str, note: str = "") -> None:
        ids = list(segment_ids)
        if ids:
            with self.db.write() as conn:
                conn.execute(update(t_segments).where(t_segments.c.id.in_(ids)).values(state=state, note=note))

    @staticmethod
    def _touch(conn: Connection, production_id: str) -> None:
        conn.execute(update(t_productions).where(t_productions.c.id == production_id).values(updated_at=time.time()))

    # ------------------------------------------------------------------ takes

    def add_take(self, production_id: str, take: Take, audio_wav: bytes, choose: bool = True, note: str = "") -> Take:
        """Store a take (and its audio); with ``choose`` it becomes the segment's chosen take and the
        segment is ready, its ``note`` set (e.g. why a take does not fit its cue). The take is stored
        even when the segment's text changed meanwhile, but then it is not chosen.

        Raises:
            ProductionNotFound: the production or segment is gone (deleted while generating).
        """
        with self.db.write() as conn:
            row = self._segment_in(conn, production_id, take.segment_id)
            digest = blobs.put(conn, audio_wav)
            if digest != take.audio_sha256:
                raise ValueError("take.audio_sha256 does not match its audio")
            conn.execute(t_takes.insert().values(
                id=take.id, segment_id=take.segment_id, created_at=take.created_at, seed=take.seed,
                source=take.source, parent_take_id=take.parent_take_id, text=take.text, voice_id=take.voice_id,
                duration_ms=take.duration_ms, sample_rate=take.sample_rate, audio_sha256=digest,
                timings=json.dumps(dict(take.timings), sort_keys=True, allow_nan=False),
                scores=json.dumps(dict(take.scores), sort_keys=True, allow_nan=False), note=take.note,
                words=json.dumps([w.as_dict() for w in take.words], allow_nan=False)))
            current = (row.text, row.voice_id) == (take.text, take.voice_id)
            if choose and current:
                conn.execute(update(t_segments).where(t_segments.c.id == take.segment_id)
                             .values(chosen_take_id=take.id, state="ready", note=note))
            elif not current:
                conn.execute(update(t_segments).where(t_segments.c.id == take.segment_id)
                             .values(state="pending", note="the text or voice changed while this take was made"))
            self._touch(conn, production_id)
        return take

    def choose(self, production_id: str, segment_id: str, take_id: str) -> Segment:
        """Make ``take_id`` the segment's chosen take.

        Raises:
            ProductionNotFound: no such production, segment, or take of that segment.
        """
        with self.db.write() as conn:
            self._segment_in(conn, production_id, segment_id)
            found = conn.execute(select(t_takes.c.id).where(t_takes.c.id == take_id,
                                                            t_takes.c.segment_id == segment_id)).first()
            if found is None:
                raise ProductionNotFound(f"segment {segment_id!r} has no take {take_id!r}")
            conn.execute(update(t_segments).where(t_segments.c.id == segment_id)
                         .values(chosen_take_id=take_id, state="ready", note=""))
            self._touch(conn, production_id)
        return self.segment(production_id, segment_id)

    def take_audio(self, take: Take) -> bytes:
        """The WAV bytes of a take (checked against their hash)."""
        with self.db.read() as conn:
            return blobs.get(conn, take.audio_sha256)
