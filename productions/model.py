"""The value types of a production, as they cross module boundaries (frozen dataclasses).

Owns: ``Production``, ``Segment``, ``Take``, ``TakeCheck``, ``Caption`` and their JSON forms, and
``ProductionNotFound``.
Does not own: storing them (``userdata.productions``), making them (``productions.service``).

A segment is *pending* while it has no chosen take: changing its text, voice or instructions drops the
choice (the old takes stay, for reference), so generation makes a take exactly for the segments that
need one -- an unchanged segment is never generated again.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Mapping

from core.errors import InputError
from core.transcript import Word

class ProductionNotFound(InputError):
    """No production (or segment, or take of it) has this id (404 at the HTTP edge)."""


SOURCE_KINDS = ("text", "script", "srt")
SEGMENT_STATES = ("pending", "generating", "ready", "failed")


@dataclass(frozen=True)
class Take:
    """One generation (or edit) of a segment: its audio is a blob addressed by ``audio_sha256``."""

    id: str
    segment_id: str
    created_at: float
    seed: int
    source: str                    # "generate", "regenerate", "edit:style:whisper", "fit:faster"
    text: str                      # what it says (the segment's text when it was made)
    voice_id: str
    duration_ms: int
    sample_rate: int
    audio_sha256: str
    parent_take_id: str | None = None
    timings: Mapping[str, float] = field(default_factory=dict)   # stage -> ms, plus total_ms
    scores: Mapping[str, float] = field(default_factory=dict)    # quality scores, where a scorer exists
    note: str = ""
    words: tuple[Word, ...] = ()   # what the recogniser heard, timed from the take's start (word captions)

    def to_json(self) -> dict:
        data = asdict(self)
        data["timings"], data["scores"] = dict(self.timings), dict(self.scores)
        data["words"] = [w.as_dict() for w in self.words]
        return data


@dataclass(frozen=True)
class TakeCheck:
    """What the quality hook found in a new take: its scores and, with a timed recogniser, its words."""

    scores: Mapping[str, float] = field(default_factory=dict)
    words: tuple[Word, ...] = ()


@dataclass(frozen=True)
class Segment:
    """One line of a production: its text, voice, optional edits, pause after it, takes and choice."""

    id: str
    production_id: str
    position: int
    text: str
    voice_id: str
    speaker: str = ""
    instructions: str = ""                 # edits applied after the clone, e.g. "whisper, slower"
    pause_ms: int = 300                    # silence after this segment in the render
    target_start_ms: int | None = None     # SRT: the cue's timing, kept as a target
    target_end_ms: int | None = None
    state: str = "pending"
    chosen_take_id: str | None = None
    note: str = ""                         # the last failure, or why a take does not fit its cue
    takes: tuple[Take, ...] = ()

    def __post_init__(self) -> None:
        if self.state not in SEGMENT_STATES:
            raise ValueError(f"Segment.state must be one of {SEGMENT_STATES}, not {self.state!r}")

    @property
    def chosen(self) -> Take | None:
        return next((t for t in self.takes if t.id == self.chosen_take_id), None)

    @property
    def pending(self) -> bool:
        return self.chosen_take_id is None

    def to_json(self) -> dict:
        return {"id": self.id, "position": self.position, "speaker": self.speaker, "text": self.text,
                "voice": self.voice_id, "instructions": self.instructions, "pause_ms": self.pause_ms,
                "target_start_ms": self.target_start_ms, "target_end_ms": self.target_end_ms,
                "state": self.state, "chosen_take_id": self.chosen_take_id, "note": self.note,
                "takes": [t.to_json() for t in self.takes]}


@dataclass(frozen=True)
class Production:
    """An ordered list of segments with a title; ``fit_to_cue`` (SRT) speeds up takes longer than their cue."""

    id: str
    title: str
    source_kind: str
    created_at: float
    updated_at: float
    fit_to_cue: bool = False
    segments: tuple[Segment, ...] = ()

    def __post_init__(self) -> None:
        if self.source_kind not in SOURCE_KINDS:
            raise ValueError(f"Production.source_kind must be one of {SOURCE_KINDS}, not {self.source_kind!r}")

    def segment(self, segment_id: str) -> Segment | None:
        return next((s for s in self.segments if s.id == segment_id), None)

    @property
    def pending(self) -> tuple[Segment, ...]:
        return tuple(s for s in self.segments if s.pending)

    def summary(self) -> dict:
        counts = {state: 0 for state in SEGMENT_STATES}
        for s in self.segments:
            counts[s.state] += 1
        return {"id": self.id, "object": "production", "title": self.title, "source": self.source_kind,
                "created_at": self.created_at, "updated_at": self.updated_at, "fit_to_cue": self.fit_to_cue,
                "segments": len(self.segments), "states": counts}

    def to_json(self) -> dict:
        return {**self.summary(), "segments": [s.to_json() for s in self.segments]}


@dataclass(frozen=True)
class Caption:
    """Where one segment's chosen take lies in a render: samples ``[start, end)`` at ``sample_rate``;
    ``words``: the segment's script words with their times in the render (seconds), when known."""

    segment_id: str
    speaker: str
    text: str
    start_sample: int
    end_sample: int
    sample_rate: int
    words: tuple[Word, ...] = ()

    @property
    def start_s(self) -> float:
        return self.start_sample / self.sample_rate

    @property
    def end_s(self) -> float:
        return self.end_sample / self.sample_rate
