"""Scripts with speakers, and the cast that maps each speaker to a stored voice.

Owns: reading a script's lines -- ``Name: line`` (also the full-width ``：``) and ``[S1] line`` -- into
(speaker, text) lines, a line without a speaker continuing the previous speaker's turn, a blank line
ending a turn (its segment gets the longer pause); checking a cast against the speakers (every speaker
cast, with the missing ones named); cutting over-long turns into segments (``productions.splitting``).
Does not own: whether a cast's voices exist (the service asks the voice store).

Paralinguistic tags at the start of a line (``[Laughter] ha``) are text, not speakers: only ``[S<n>]``
is a speaker tag. A ``Name:`` is at most 40 characters of letters, digits, spaces, ``.'_-``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

from core.errors import InputError
from productions.splitting import split_paragraph

_TAGGED = re.compile(r"^\[(S\d{1,3})\]\s*(.*)$")
_NAMED = re.compile(r"^([^\W\d][\w .'\-]{0,39}?)\s*[:：]\s*(.*)$")
MAX_SPEAKERS = 32


@dataclass(frozen=True)
class ScriptLine:
    """One segment of a script: who says what, and whether it ends a turn."""

    speaker: str
    text: str
    turn_end: bool = False


def parse_script(script: str, max_chars: int) -> list[ScriptLine]:
    """The script's segments in order.

    Raises:
        InputError: empty script, text before the first speaker (with its line number), more than
            :data:`MAX_SPEAKERS` speakers.
    """
    if not script or not script.strip():
        raise InputError("the script is empty: write lines such as 'Alice: Hello.' or '[S1] Hello.'")
    turns: list[tuple[str, list[str]]] = []
    speaker = None
    for number, raw in enumerate(script.splitlines(), 1):
        line = raw.strip()
        if not line:
            if turns and turns[-1][1]:
                turns.append((turns[-1][0], []))   # a blank line closes the turn
            continue
        match = _TAGGED.match(line) or _NAMED.match(line)
        if match:
            speaker, line = match.group(1).strip(), match.group(2).strip()
            turns.append((speaker, []))
            if not line:
                continue
        elif speaker is None:
            raise InputError(f"script line {number} has no speaker: start it with 'Name: ' or '[S1] ' "
                             f"({raw.strip()[:60]!r})")
        turns[-1][1].append(line)
    lines: list[ScriptLine] = []
    for who, texts in turns:
        if not texts:
            continue
        pieces = split_paragraph(" ".join(texts), max_chars)
        lines.extend(ScriptLine(who, p, turn_end=(i == len(pieces) - 1)) for i, p in enumerate(pieces))
    if not lines:
        raise InputError("the script has speakers but nothing for them to say")
    speakers = speakers_of(lines)
    if len(speakers) > MAX_SPEAKERS:
        raise InputError(f"the script has {len(speakers)} speakers; at most {MAX_SPEAKERS}")
    return lines


def speakers_of(lines: list[ScriptLine]) -> list[str]:
    """The speakers in order of first appearance."""
    return list(dict.fromkeys(line.speaker for line in lines))


def check_cast(speakers: list[str], cast: Mapping[str, str]) -> dict[str, str]:
    """``cast`` restricted to ``speakers`` (speaker -> voice id).

    Raises:
        InputError: a speaker has no voice in the cast (all missing ones are named).
    """
    missing = [s for s in speakers if not (cast.get(s) or "").strip()]
    if missing:
        raise InputError(f"the cast has no voice for {', '.join(repr(s) for s in missing)}; "
                         f"give a stored voice id for every speaker ({', '.join(speakers)})")
    return {s: cast[s].strip() for s in speakers}
