"""Word timestamps of a take and word-level caption lines.

Owns: ``word_timestamps`` (the recogniser's timed words of a take, clamped to the audio) and
``caption_lines`` (words grouped into short caption lines, for productions' word-level captions and
subtitle files), with their frozen value type ``Caption``.
Does not own: recognition (``quality.contract.Recognizer``), subtitle file formats, productions.

Units: a recogniser returns its own tokens -- words for English, characters for Chinese (the
Paraformer's vocabulary is characters for Chinese and word pieces for English). A recogniser that
gives no timings (``Recognition.timed`` False) gets an ``InputError``; times are never interpolated.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.audio_io import Audio
from core.errors import InputError
from quality.content import is_chinese
from quality.contract import Recognizer, Word


def word_timestamps(audio: Audio, recognizer: Recognizer | None) -> tuple[Word, ...]:
    """The words ``audio`` says, each with its start and end in seconds (inside the audio).

    Raises:
        InputError: no recogniser is loaded, or it gives no word timings.
        ModelError: the recogniser failed.
    """
    if recognizer is None:
        raise InputError("word timestamps need a speech recogniser, and this engine has none")
    heard = recognizer.recognize(audio)
    if not heard.timed:
        raise InputError(f"the recogniser {recognizer.name} gives no word timings")
    end = audio.duration
    return tuple(Word(w.text, min(max(0.0, w.start_s), end), min(max(w.start_s, w.end_s), end)) for w in heard.words)


@dataclass(frozen=True)
class Caption:
    """One caption line: its text, its span in seconds and the words in it."""

    text: str
    start_s: float
    end_s: float
    words: tuple[Word, ...]

    def as_dict(self) -> dict:
        return {"text": self.text, "start": round(self.start_s, 3), "end": round(self.end_s, 3),
                "words": [w.as_dict() for w in self.words]}


def caption_lines(words: tuple[Word, ...], max_chars: int = 42, max_gap_s: float = 0.8,
                  offset_s: float = 0.0) -> tuple[Caption, ...]:
    """Group timed words into caption lines of at most ``max_chars`` characters, breaking also at a
    pause longer than ``max_gap_s``; ``offset_s`` shifts every time (a segment's place in a production).

    42 characters is the usual subtitle line limit. Chinese characters are joined without spaces.
    """
    if max_chars < 1:
        raise ValueError("max_chars must be positive")
    lines: list[Caption] = []
    current: list[Word] = []

    def joined(ws: list[Word]) -> str:
        text = "".join(w.text for w in ws)
        return text if is_chinese(text) else " ".join(w.text for w in ws)

    def flush() -> None:
        if current:
            shifted = tuple(Word(w.text, w.start_s + offset_s, w.end_s + offset_s) for w in current)
            lines.append(Caption(joined(current), shifted[0].start_s, shifted[-1].end_s, shifted))
            current.clear()

    for word in words:
        if current and (len(joined(current + [word])) > max_chars or word.start_s - current[-1].end_s > max_gap_s):
            flush()
        current.append(word)
    flush()
    return tuple(lines)
