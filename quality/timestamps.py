"""Word timestamps of a take and word-level caption lines.

Owns: ``word_timestamps`` (the recogniser's timed words of a take, clamped to the audio),
``script_words`` (the words of the text the take was made from, timed by aligning them with what the
recogniser heard: captions show the script, not the recogniser's spelling) and ``caption_lines``
(words grouped into short caption lines, for productions' word-level captions and subtitle files),
with their frozen value type ``Caption``.
Does not own: recognition (``quality.contract.Recognizer``), subtitle file formats, productions.

Units: a recogniser returns its own tokens -- words for English, characters for Chinese (the
Paraformer's vocabulary is characters for Chinese and word pieces for English). A recogniser that
gives no timings (``Recognition.timed`` False) gets an ``InputError``; the recogniser's times are
never interpolated. ``script_words`` is for display: a script word the recogniser did not hear is
placed in the gap its heard neighbours leave (shared evenly with other unheard words there), and a
heard word of several Chinese characters shares its span evenly among them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import jiwer

from core.audio_io import Audio
from core.errors import InputError
from quality.content import HAN, is_chinese, normalise, strip_tags
from core.transcript import Word
from quality.contract import Recognition, Recognizer


def word_timestamps(audio: Audio, recognizer: Recognizer | None, heard: Recognition | None = None) -> tuple[Word, ...]:
    """The words ``audio`` says, each with its start and end in seconds (inside the audio).

    ``heard``: the recogniser's result for ``audio`` when a content check already ran (not run twice).

    Raises:
        InputError: no recogniser is loaded, or it gives no word timings.
        ModelError: the recogniser failed.
    """
    if recognizer is None:
        raise InputError("word timestamps need a speech recogniser, and this engine has none")
    if heard is None:
        heard = recognizer.recognize(audio)
    if not heard.timed:
        raise InputError(f"the recogniser {recognizer.name} gave no word timings for this audio")
    end = audio.duration
    return tuple(Word(w.text, min(max(0.0, w.start_s), end), min(max(w.start_s, w.end_s), end)) for w in heard.words)


_CHINESE_UNIT = re.compile(f"[{HAN}]|[^\\s{HAN}]+")    # a Han character, or a run of anything else


def _script_units(text: str, chinese: bool) -> list[tuple[str, str]]:
    """``(shown, key)`` per unit of the script: words (characters for Chinese) as shown, with the
    punctuation around them kept on the unit, and their normalised form to align on."""
    text = " ".join(strip_tags(text).split())
    pieces = _CHINESE_UNIT.findall(text) if chinese else text.split()
    units: list[tuple[str, str]] = []
    lead = ""                             # punctuation before the first word: shown with it
    for piece in pieces:
        key = _unit_key(piece, chinese)
        if not key:                       # punctuation alone: shown with the unit before it
            if units:
                units[-1] = (units[-1][0] + piece, units[-1][1])
            else:
                lead += piece + ("" if chinese else " ")
            continue
        units.append((lead + piece, key))
        lead = ""
    return units


def _unit_key(piece: str, chinese: bool) -> str:
    """One unit's normalised form, without spaces: "don't" and "e.g." stay one unit to align on."""
    return normalise(piece, chinese).replace(" ", "")


def script_words(text: str, heard: tuple[Word, ...]) -> tuple[Word, ...]:
    """The units of ``text`` (as written) timed by aligning them with the ``heard`` words (jiwer's
    alignment of the normalised forms). Empty when nothing was heard or the text has no words."""
    chinese = is_chinese(text)
    units = _script_units(text, chinese)
    timed_heard = []
    for w in heard:                       # a heard word may hold several Chinese characters: split it
        key = _unit_key(w.text, chinese)
        parts = _CHINESE_UNIT.findall(key) if chinese else [key] if key else []
        for i, part in enumerate(parts):
            step = (w.end_s - w.start_s) / len(parts)
            timed_heard.append((part, w.start_s + i * step, w.start_s + (i + 1) * step))
    if not units or not timed_heard:
        return ()
    times: list[tuple[float, float] | None] = [None] * len(units)
    alignment = jiwer.process_words(" ".join(k for _, k in units), " ".join(k for k, _, _ in timed_heard))
    for chunk in alignment.alignments[0]:
        if chunk.type in ("equal", "substitute"):
            for offset in range(chunk.ref_end_idx - chunk.ref_start_idx):
                _, start, end = timed_heard[chunk.hyp_start_idx + offset]
                times[chunk.ref_start_idx + offset] = (start, end)
    _fill_gaps(times, timed_heard[0][1], timed_heard[-1][2])
    return tuple(Word(shown, start, end) for (shown, _), (start, end) in zip(units, times))


def _fill_gaps(times: list, first: float, last: float) -> None:
    """Place runs of unheard units evenly in the gap between their heard neighbours."""
    i = 0
    while i < len(times):
        if times[i] is not None:
            i += 1
            continue
        j = i
        while j < len(times) and times[j] is None:
            j += 1
        lo = times[i - 1][1] if i > 0 else first
        hi = times[j][0] if j < len(times) else last
        hi = max(hi, lo)
        step = (hi - lo) / (j - i)
        for k in range(i, j):
            times[k] = (lo + (k - i) * step, lo + (k - i + 1) * step)
        i = j


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
