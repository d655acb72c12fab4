"""The value type for what speech recognition heard in a clip.

Owns: ``Transcript`` and ``Word`` (a heard word with its times, also the quality checks' unit), shared
by the stage that transcribes (``tokenizer/asr.py``), the engines that hand it on
(``tts_engine.contract.Engine.transcribe``) and the quality checks. It lives here, below them all, so
the tokenizer never imports from the engine layer.
Does not own: running an ASR model (``tokenizer/asr.py``), deciding when to transcribe (the engines).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from core.timings import StageTimings


@dataclass(frozen=True)
class Word:
    """One heard word (a character for Chinese) and where it is heard, in seconds from the start."""

    text: str
    start_s: float
    end_s: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.start_s) and math.isfinite(self.end_s)) or self.end_s < self.start_s:
            raise ValueError(f"end_s must be >= start_s, both finite; got {self.start_s}..{self.end_s}")

    def as_dict(self) -> dict:
        return {"word": self.text, "start": round(self.start_s, 3), "end": round(self.end_s, 3)}


@dataclass(frozen=True)
class Transcript:
    """What an engine heard in a clip (its ASR), to be corrected by the user if need be.

    ``words`` are the model's own word timings when it gives them (``timed``); otherwise empty.
    """

    text: str
    timings: StageTimings
    model: str = ""                    # which ASR model, e.g. the Paraformer folder's name
    words: tuple[Word, ...] = ()
    timed: bool = False
