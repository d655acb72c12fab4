"""What a scorer needs from a model: a recogniser (audio -> words) and a speaker embedder (audio -> vector).

Owns: the ``Recognizer`` and ``Embedder`` protocols and their value types (``Word``, ``Recognition``).
Production plugs in the engine's own models (``quality.engine_models``); tests and benches plug in
real small models that ship inside pip packages (``testkit.quality_models``). A scorer given no model
reports "unavailable" -- it never guesses.
Does not own: scoring (``quality.content``, ``quality.speaker``), the models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from core.audio_io import Audio


@dataclass(frozen=True)
class Word:
    """One recognised word (a character for Chinese) and where it is heard, in seconds from the start."""

    text: str
    start_s: float
    end_s: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.start_s) and math.isfinite(self.end_s)) or self.end_s < self.start_s:
            raise ValueError(f"end_s must be >= start_s, both finite; got {self.start_s}..{self.end_s}")

    def as_dict(self) -> dict:
        return {"word": self.text, "start": round(self.start_s, 3), "end": round(self.end_s, 3)}


@dataclass(frozen=True)
class Recognition:
    """What a recogniser heard: the transcript and, when the model gives them, word timings.

    ``timed`` says whether ``words`` carry real timings; a model without them (e.g. the streaming
    Paraformer through funasr) returns ``timed=False`` and no words, never invented times.
    """

    text: str
    words: tuple[Word, ...] = ()
    timed: bool = False
    model: str = ""


@runtime_checkable
class Recognizer(Protocol):
    """Speech recognition. Implementations must be thread-safe (serialise inside if the model is not).
    ``timed``: whether its recognitions carry word timings."""

    name: str
    timed: bool

    def recognize(self, audio: Audio) -> Recognition:
        """What ``audio`` says.

        Raises:
            ModelError: the model failed.
        """
        ...


@runtime_checkable
class Embedder(Protocol):
    """Speaker embeddings. Implementations must be thread-safe."""

    name: str

    def embed(self, audio: Audio) -> np.ndarray:
        """A 1-D speaker embedding of ``audio`` (any length the model defines).

        Raises:
            InputError: the clip is too short for the model.
            ModelError: the model failed.
        """
        ...
