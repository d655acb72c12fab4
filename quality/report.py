"""One take's scores, and the scorer that produces them.

Owns: ``QualityReport`` (signal, content and speaker scores, whether the take passed the gates and
why not, how long scoring took), its JSON and ``X-Quality`` header forms, and ``QualityScorer``, which
holds the models (a recogniser and an embedder, either may be None) and scores a take.
Does not own: the scorers' arithmetic (``quality.content``, ``quality.speaker``,
``quality.signal_checks``), generating takes (``quality.gates``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from core.audio_io import Audio
from core.errors import InputError
from core.settings import QUALITY_CHECKS
from quality.content import ContentScore, score_content
from quality.contract import Embedder, Recognizer
from quality.signal_checks import SignalScore, score_signal
from quality.speaker import SpeakerReference, SpeakerScore, score_speaker

CHECKS = QUALITY_CHECKS   # ("signal", "content", "speaker")
# A take that is silent failed whatever the thresholds say.
FAILING_FLAGS = ("silent",)


@dataclass(frozen=True)
class QualityReport:
    """The scores of one take. ``content`` / ``speaker`` are None when that check was not asked for."""

    signal: SignalScore | None
    content: ContentScore | None
    speaker: SpeakerScore | None
    failed: tuple[str, ...] = ()      # why the take is below the gates ("content_error 0.42 > 0.2", ...)
    score_ms: float = 0.0
    seed: int | None = None

    @property
    def passed(self) -> bool:
        return not self.failed

    @property
    def error(self) -> float | None:
        return self.content.error if self.content is not None and self.content.available else None

    @property
    def similarity(self) -> float | None:
        return self.speaker.similarity if self.speaker is not None and self.speaker.available else None

    @property
    def flags(self) -> tuple[str, ...]:
        return self.signal.flags if self.signal is not None else ()

    def as_dict(self) -> dict:
        out: dict = {"passed": self.passed, "failed": list(self.failed), "score_ms": round(self.score_ms, 1)}
        if self.seed is not None:
            out["seed"] = self.seed
        for name in CHECKS:
            part = getattr(self, name)
            if part is not None:
                out[name] = part.as_dict()
        return out

    def take_scores(self) -> dict[str, float]:
        """The numbers as a flat mapping (a production take keeps these): ``passed`` 1/0, ``flags`` (how many
        signal flags), and ``error``, ``similarity``, ``lufs``, ``peak``, ``duration_ratio`` where measured."""
        out = {"passed": 1.0 if self.passed else 0.0, "flags": float(len(self.flags))}
        values = {"error": self.error, "similarity": self.similarity}
        if self.signal is not None:
            values.update(lufs=self.signal.lufs, peak=self.signal.peak, duration_ratio=self.signal.duration_ratio)
        out.update({name: float(v) for name, v in values.items() if v is not None})
        return out

    def header(self, **extra) -> str:
        """Compact ASCII JSON for the ``X-Quality`` header: the numbers, without the transcript."""
        body = self.as_dict()
        if "content" in body:
            body["content"].pop("transcript", None)
        body.update(extra)
        return json.dumps(body, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


class QualityScorer:
    """Scores takes with the models it was given (either may be None: that check is then unavailable).

    Parameters:
        recognizer: speech recognition for the content check (the engine's Paraformer in production).
        embedder: speaker embeddings for the voice check (the engine's CAM++ in production).
    """

    def __init__(self, recognizer: Recognizer | None = None, embedder: Embedder | None = None) -> None:
        self.recognizer, self.embedder = recognizer, embedder

    def describe(self) -> dict:
        return {"content": self.recognizer.name if self.recognizer else None,
                "speaker": self.embedder.name if self.embedder else None}

    def available_checks(self) -> frozenset[str]:
        """The checks this scorer can run (signal always; content and speaker with their models)."""
        return frozenset({"signal"} | ({"content"} if self.recognizer else set()) | ({"speaker"} if self.embedder else set()))

    def check_available(self, checks) -> None:
        """Refuse checks this scorer cannot do (a threshold on an unavailable score could never be met).

        Raises:
            InputError: naming the check and why.
        """
        if "content" in checks and self.recognizer is None:
            raise InputError("the content check (max_error) needs a speech recogniser, and this engine has none "
                             "(it is the tokenizer folder's Paraformer: put Step-Audio-Tokenizer under --model-root)")
        if "speaker" in checks and self.embedder is None:
            raise InputError("the speaker check (min_similarity) needs a speaker model, and this engine has none "
                             "(the preview engine has no CAM++; load Step-Audio-EditX)")

    def reference(self, prompt: Audio | None) -> SpeakerReference:
        """The prompt side of the voice check (embedded once, on first use)."""
        return SpeakerReference(prompt, self.embedder)

    def score(self, audio: Audio, text: str, checks, reference: SpeakerReference | None = None, *,
              max_error: float | None = None, min_similarity: float | None = None,
              seed: int | None = None) -> QualityReport:
        """Score ``audio`` (which should say ``text``) with the named ``checks`` (a subset of CHECKS).

        Returns:
            QualityReport, ``failed`` naming each threshold the take misses (and a silent take).
        """
        started = time.perf_counter()
        signal = score_signal(audio, text) if "signal" in checks else None
        content = score_content(audio, text, self.recognizer) if "content" in checks else None
        speaker = None
        if "speaker" in checks:
            speaker = score_speaker(audio, reference if reference is not None else self.reference(None))
        failed = [f"signal: {flag}" for flag in (signal.flags if signal else ()) if flag in FAILING_FLAGS]
        if max_error is not None and content is not None and content.available and content.error > max_error:
            failed.append(f"content: {content.measure} {content.error:.3f} > {max_error:g}")
        if min_similarity is not None and speaker is not None and speaker.available \
                and speaker.similarity < min_similarity:
            failed.append(f"speaker: similarity {speaker.similarity:.3f} < {min_similarity:g}")
        return QualityReport(signal, content, speaker, tuple(failed), (time.perf_counter() - started) * 1000.0, seed)
