"""Speaker similarity: the cosine of speaker embeddings, take against prompt.

Owns: ``cosine``, ``score_speaker`` / ``SpeakerScore`` and ``SpeakerReference`` (a prompt's
embedding, computed once and shared by every candidate of a request).
Does not own: the embedder (``quality.contract.Embedder``: CAM++ in production), thresholds.

Similarity is in [-1, 1]; the same voice scores high (CAM++ typically > 0.6 for the same speaker),
different voices lower. Values are comparable only between takes scored by the same embedder.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import numpy as np

from core.audio_io import Audio
from core.errors import InputError, ModelError
from quality.contract import Embedder

log = logging.getLogger(__name__)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two 1-D vectors (0.0 when either is all zeros)."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"embeddings differ in size: {a.shape} vs {b.shape}")
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.dot(a, b) / norm) if norm > 0 else 0.0


@dataclass(frozen=True)
class SpeakerScore:
    """The voice check of one take. ``similarity`` is None when ``available`` is False."""

    available: bool
    similarity: float | None = None
    model: str = ""
    reason: str = ""

    def as_dict(self) -> dict:
        if not self.available:
            return {"available": False, "reason": self.reason}
        return {"available": True, "similarity": round(self.similarity, 4), "model": self.model}


class SpeakerReference:
    """The prompt side of the comparison: embeds the prompt at most once (thread-safe)."""

    def __init__(self, prompt: Audio | None, embedder: Embedder | None) -> None:
        self.prompt, self.embedder = prompt, embedder
        self._lock = threading.Lock()
        self._embedding: np.ndarray | None = None
        self._failure = ""

    def embedding(self) -> tuple[np.ndarray | None, str]:
        """(the prompt's embedding, "") or (None, why not)."""
        if self.embedder is None:
            return None, "no speaker model is loaded (the preview engine has none)"
        if self.prompt is None:
            return None, "there is no prompt clip to compare with"
        with self._lock:
            if self._embedding is None and not self._failure:
                try:
                    self._embedding = np.asarray(self.embedder.embed(self.prompt), np.float64)
                except (InputError, ModelError) as exc:
                    log.warning("speaker check: the prompt could not be embedded: %s", exc)
                    self._failure = f"the prompt could not be embedded: {exc}"
        return self._embedding, self._failure


def score_speaker(audio: Audio, reference: SpeakerReference) -> SpeakerScore:
    """Cosine similarity of ``audio``'s speaker embedding and the reference prompt's.

    Returns:
        SpeakerScore; unavailable (never an error) without an embedder or when a clip cannot be embedded.
    """
    prompt_embedding, why = reference.embedding()
    if prompt_embedding is None:
        return SpeakerScore(False, reason=why)
    embedder = reference.embedder
    try:
        take = embedder.embed(audio)
    except (InputError, ModelError) as exc:
        log.warning("speaker check: the take could not be embedded: %s", exc)
        return SpeakerScore(False, reason=f"the take could not be embedded: {exc}", model=embedder.name)
    return SpeakerScore(True, cosine(take, prompt_embedding), embedder.name)
