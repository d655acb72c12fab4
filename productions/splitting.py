"""Plain text -> the texts of a production's segments.

Owns: cutting a text into segments at paragraph and sentence ends (English and Chinese punctuation),
one sentence per segment, a sentence longer than the model takes in one go cut further at clauses,
then words (tags such as ``[Laughter]`` and pinyin such as ``guo4`` are never cut: ``llm.longform``'s
sentence units do that); a leading language tag (``[Cantonese]``) carried into every segment of its
paragraph; which segments end a paragraph (they get the longer pause).
Does not own: the sentence and clause rules themselves (``llm.longform``), pauses' lengths (settings).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from core.edit_options import LANGUAGE_TAGS
from core.errors import InputError
from llm.longform import split_units

_PARAGRAPH = re.compile(r"\n[ \t\u3000]*\n+")


@dataclass(frozen=True)
class TextPiece:
    """One segment's text, and whether it ends its paragraph."""

    text: str
    paragraph_end: bool = False


def split_paragraph(paragraph: str, max_chars: int) -> list[str]:
    """One paragraph's sentences (each at most ``max_chars`` plus a carried language tag), in order."""
    body = " ".join(paragraph.split()) if not re.search(r"[\u3400-\u9fff]", paragraph) else paragraph.strip()
    tag = next((t for t in LANGUAGE_TAGS if body.startswith(t)), "")
    if tag:
        body = body[len(tag):].strip()
    pieces = [p.strip() for p in split_units(body, max_chars) if p.strip()]
    return [tag + p for p in pieces] if tag else pieces


def split_segments(text: str, max_chars: int) -> list[TextPiece]:
    """The segments of ``text``: paragraphs (blank lines) into sentences.

    Parameters:
        text: the whole text; lines inside a paragraph are joined.
        max_chars: the most characters one segment may hold (what the model takes in one go).

    Raises:
        InputError: the text is empty or only whitespace.
    """
    if not text or not text.strip():
        raise InputError("the text is empty: give at least one sentence")
    pieces: list[TextPiece] = []
    for paragraph in _PARAGRAPH.split(text.strip()):
        sentences = split_paragraph(paragraph, max_chars)
        pieces.extend(TextPiece(s, paragraph_end=(i == len(sentences) - 1)) for i, s in enumerate(sentences))
    if not pieces:
        raise InputError("the text has nothing to speak")
    return pieces
