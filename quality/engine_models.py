"""The real engine's own models as a quality recogniser and speaker embedder.

Owns: ``ParaformerRecognizer`` (the tokenizer folder's Paraformer, through ``tokenizer.asr.Transcriber``),
``CamPlusEmbedder`` (the decoder's CAM++, through ``decoder.frontend.PromptFrontend.embedding``, the
same embedding the prompt features carry) and ``scorer_for_engine``, which builds a
``QualityScorer`` from whatever an engine has: Step-Audio-EditX has both; the preview engine has no
CAM++, and the Paraformer only when the tokenizer folder is under ``--model-root`` -- a missing model's
check is "unavailable".
Does not own: the models, the engines.

Word timings: the Paraformer's come from its own CIF weights (``tokenizer.asr``, ``tokenizer.cif_timing``);
a recognition whose weights did not account for the emitted tokens comes back untimed (never interpolated).
"""

from __future__ import annotations

import logging

import numpy as np

from core.audio_io import Audio
from core.errors import InputError
from quality.contract import Recognition
from quality.report import QualityScorer

log = logging.getLogger(__name__)


class ParaformerRecognizer:
    """``Recognizer`` over a ``tokenizer.asr.Transcriber`` (thread-safe: it serialises)."""

    timed = True           # word times from the model's CIF weights (tokenizer.cif_timing)

    def __init__(self, transcriber) -> None:
        self.transcriber = transcriber
        self.name = f"paraformer:{transcriber.folder.name}"

    def recognize(self, audio: Audio) -> Recognition:
        try:
            transcript = self.transcriber.transcribe(audio)
        except InputError as exc:
            if "no words were heard" in str(exc):
                return Recognition("", (), True, self.name)   # heard nothing: every word is missing
            raise
        return Recognition(transcript.text, transcript.words, transcript.timed, self.name)


class CamPlusEmbedder:
    """``Embedder`` over the decoder's ``PromptFrontend`` (CAM++, 192 values; ONNX Runtime, thread-safe)."""

    def __init__(self, frontend) -> None:
        self.frontend = frontend
        self.name = "campplus"

    def embed(self, audio: Audio) -> np.ndarray:
        return np.asarray(self.frontend.embedding(audio.samples, audio.sample_rate), np.float32).ravel()


def scorer_for_engine(engine) -> QualityScorer:
    """A scorer with the models ``engine`` carries (none for the preview engine)."""
    recognizer = embedder = None
    transcriber = getattr(engine, "transcriber", None)
    if transcriber is not None and getattr(transcriber, "available", False):
        recognizer = ParaformerRecognizer(transcriber)
    frontend = getattr(getattr(engine, "decoder", None), "frontend", None)
    if frontend is not None and hasattr(frontend, "embedding"):
        embedder = CamPlusEmbedder(frontend)
    log.info("quality scorer: content check by %s, speaker check by %s",
             recognizer.name if recognizer else "nothing (unavailable)",
             embedder.name if embedder else "nothing (unavailable)")
    return QualityScorer(recognizer, embedder)
