"""The value type for what speech recognition heard in a clip.

Owns: ``Transcript``, shared by the stage that transcribes (``tokenizer/asr.py``) and the engines that
hand it on (``tts_engine.contract.Engine.transcribe``). It lives here, below both, so the tokenizer
never imports from the engine layer.
Does not own: running an ASR model (``tokenizer/asr.py``), deciding when to transcribe (the engines).
"""

from __future__ import annotations

from dataclasses import dataclass

from core.timings import StageTimings


@dataclass(frozen=True)
class Transcript:
    """What an engine heard in a clip (its ASR), to be corrected by the user if need be."""

    text: str
    timings: StageTimings
    model: str = ""                    # which ASR model, e.g. the Paraformer folder's name
