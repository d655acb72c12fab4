"""SRT subtitles as a production's input: one segment per cue, its timing kept as a target.

Owns: parsing SRT text into cues (index, start, end, text; ``<i>``-style markup removed), the clear
errors for broken cues (a bad timestamp line, end before start, a cue that overlaps the one before,
a cue with no text -- each naming the cue and its line), and the speed a take needs to fit its cue.
Does not own: writing captions (``productions.captions``), applying the speed (the service asks the
engine for speed edits).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from core.errors import InputError

_TIME = r"(\d{1,2}):(\d{2}):(\d{2})[,.](\d{1,3})"
_TIMING = re.compile(rf"^{_TIME}\s*-->\s*{_TIME}(?:\s+.*)?$")
_MARKUP = re.compile(r"</?[a-zA-Z][^<>]{0,40}>|\{\\[^{}]{0,40}\}")
# The speed edits an engine offers, mildest first, with the tempo each aims at (upstream's
# training data: "faster" ~ 1.2x, "more faster" ~ 1.5x). A take is fitted with the mildest that suffices.
SPEED_STEPS = (("faster", 1.2), ("more faster", 1.5))


@dataclass(frozen=True)
class Cue:
    """One subtitle cue; times in milliseconds."""

    index: int
    start_ms: int
    end_ms: int
    text: str

    @property
    def duration_ms(self) -> int:
        return self.end_ms - self.start_ms


def _ms(h: str, m: str, s: str, frac: str) -> int:
    if int(m) > 59 or int(s) > 59:
        raise ValueError("minutes and seconds must be below 60")
    return ((int(h) * 60 + int(m)) * 60 + int(s)) * 1000 + int(frac.ljust(3, "0"))


def parse_srt(text: str) -> list[Cue]:
    """The cues of an SRT file, in order.

    Raises:
        InputError: empty file, a block without a valid ``00:00:01,000 --> 00:00:02,500`` line, end not
            after start, a cue starting before the previous one ends, or a cue without text.
    """
    if not text or not text.strip():
        raise InputError("the SRT file is empty")
    lines = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n").split("\n")
    cues: list[Cue] = []
    i = 0
    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        first_line = i + 1
        block = []
        while i < len(lines) and lines[i].strip():
            block.append(lines[i].strip())
            i += 1
        number = len(cues) + 1
        timing_at = 1 if len(block) > 1 and block[0].isdigit() else 0
        match = _TIMING.match(block[timing_at])
        if not match:
            raise InputError(f"SRT cue {number} (line {first_line + timing_at}): expected a timing line such as "
                             f"'00:00:01,000 --> 00:00:02,500', got {block[timing_at][:60]!r}")
        try:
            start, end = _ms(*match.groups()[:4]), _ms(*match.groups()[4:])
        except ValueError as exc:
            raise InputError(f"SRT cue {number} (line {first_line + timing_at}): bad timestamp ({exc})") from None
        if end <= start:
            raise InputError(f"SRT cue {number} (line {first_line + timing_at}): it ends at {block[timing_at].split('-->')[1].strip()}, "
                             "not after it starts")
        if cues and start < cues[-1].end_ms:
            raise InputError(f"SRT cue {number} (line {first_line + timing_at}) starts at {_clock(start)}, before cue "
                             f"{cues[-1].index} ends ({_clock(cues[-1].end_ms)}): cues must not overlap")
        words = " ".join(_MARKUP.sub("", line) for line in block[timing_at + 1:]).strip()
        if not words:
            raise InputError(f"SRT cue {number} (line {first_line + timing_at}) has no text")
        cues.append(Cue(number, start, end, words))
    if not cues:
        raise InputError("the SRT file has no cues")
    return cues


def _clock(ms: int) -> str:
    return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"


def speed_needed(take_ms: float, cue_ms: float) -> str | None:
    """The mildest speed edit expected to fit a take of ``take_ms`` into ``cue_ms`` (None when it fits
    already; the strongest when none is expected to suffice -- the caller checks the result)."""
    if take_ms <= cue_ms:
        return None
    ratio = take_ms / cue_ms
    for option, tempo in SPEED_STEPS:
        if ratio <= tempo:
            return option
    return SPEED_STEPS[-1][0]
