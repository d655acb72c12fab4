"""What a scorer needs from a model: a recogniser (audio -> words) and a speaker embedder (audio -> vector).

Owns: the ``Recognizer`` and ``Embedder`` protocols and the ``Recognition`` value type (its ``Word``
is ``core.transcript``'s, shared with the tokenizer's ASR).
Production plugs in the engine's own models (``quality.engine_models``); tests and benches plug in
real small models that ship inside pip packages (``testkit.quality_models``). A scorer given no model
reports "unavailable" -- it never guesses.
Does not own: scoring (``quality.content``, ``quality.speaker``), the models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from core.audio_io import Audio
from core.transcript import Word


@dataclass(frozen=True)
class Recognition:
    """What a recogniser heard: the transcript and, when the model gives them, word timings.

    ``timed`` says whether ``words`` carry real timings; a model without them returns ``timed=False``
    and no words, never invented times.
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
