"""Content error: what the take says (by a recogniser) against what it should say.

Owns: text normalisation for scoring, the choice of measure (character error rate for Chinese, word
error rate otherwise; both computed by jiwer), and ``score_content`` / ``ContentScore``.
Does not own: the recogniser (``quality.contract.Recognizer``), thresholds (``quality.gates``).

Normalisation, applied to both sides: Unicode NFKC, lower case, the engine's tags removed
(``[Laughter]``, ``(whisper)``-style markup is not spoken as words), punctuation and symbols
dropped, whitespace collapsed. Numbers are not spelled out: "9" and "nine" differ (a recogniser that
writes digits should be paired with targets that do too). For Chinese the spaces are removed and
every character is a unit; a text is "Chinese" when Han characters are at least half of its letters.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from dataclasses import dataclass

import jiwer

from core.audio_io import Audio
from core.errors import InputError, ModelError
from quality.contract import Recognition, Recognizer

log = logging.getLogger(__name__)

_TAG = re.compile(r"\[[^\]]{0,40}\]|\([^)]{0,40}\)")
HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"      # Han character ranges, for a regex class
_HAN = re.compile(f"[{HAN}]")


def is_chinese(text: str) -> bool:
    """Han characters are at least half of the letters of ``text``."""
    letters = [c for c in text if c.isalpha()]
    return bool(letters) and sum(1 for c in letters if _HAN.match(c)) * 2 >= len(letters)


def strip_tags(text: str) -> str:
    """``text`` without the engine's tags (``[Laughter]``, ``(whisper)``): they are not spoken as words."""
    return _TAG.sub(" ", text)


def normalise(text: str, chinese: bool | None = None) -> str:
    """``text`` as it is compared (see the module docstring); Chinese comes back without spaces."""
    text = strip_tags(unicodedata.normalize("NFKC", text)).lower()
    kept = "".join(c if not unicodedata.category(c).startswith(("P", "S")) else " " for c in text)
    words = kept.split()
    if chinese if chinese is not None else is_chinese(text):
        return "".join(words)
    return " ".join(words)


def content_error(transcript: str, target: str) -> tuple[str, float]:
    """(measure, error) of ``transcript`` against ``target``: ("cer", CER) for Chinese targets, else
    ("wer", WER). 0.0 is a perfect match; insertions can push it above 1.0.

    Raises:
        InputError: ``target`` has nothing to compare once normalised (only tags or punctuation).
    """
    chinese = is_chinese(target)
    reference, hypothesis = normalise(target, chinese), normalise(transcript, chinese)
    if not reference:
        raise InputError("the text has no words to check the take against")
    if chinese:
        # Characters are the units: separate them so jiwer's word measure counts each one.
        return "cer", float(jiwer.wer(" ".join(reference), " ".join(hypothesis) if hypothesis else ""))
    return "wer", float(jiwer.wer(reference, hypothesis))


@dataclass(frozen=True)
class ContentScore:
    """The content check of one take. ``error`` is None when ``available`` is False (``reason`` says why)."""

    available: bool
    error: float | None = None
    measure: str = ""                 # "cer" or "wer"
    transcript: str = ""
    recognition: Recognition | None = None
    model: str = ""
    reason: str = ""

    def as_dict(self) -> dict:
        if not self.available:
            return {"available": False, "reason": self.reason}
        return {"available": True, "error": round(self.error, 4), "measure": self.measure,
                "transcript": self.transcript, "model": self.model}


def score_content(audio: Audio, target: str, recognizer: Recognizer | None) -> ContentScore:
    """Recognise ``audio`` and compare it with ``target``.

    Returns:
        ContentScore; unavailable (never an error) when there is no recogniser, the text has no
        words, or the recogniser failed (the failure is logged).
    """
    if recognizer is None:
        return ContentScore(False, reason="no speech recogniser is loaded (the tokenizer folder's Paraformer is absent)")
    try:
        heard = recognizer.recognize(audio)
    except (ModelError, InputError) as exc:
        log.warning("content check: the recogniser %s failed: %s", recognizer.name, exc)
        return ContentScore(False, reason=f"the recogniser failed: {exc}", model=recognizer.name)
    try:
        measure, error = content_error(heard.text, target)
    except InputError as exc:
        return ContentScore(False, reason=str(exc), model=recognizer.name)
    return ContentScore(True, error, measure, heard.text, heard, recognizer.name)
