"""Long target text: split it into chunks the LLM handles well, and join the audio pieces.

Owns: sentence splitting (English and Chinese punctuation), packing sentences into chunks of at
most ``max_chars`` (never cutting through a tag or a pinyin syllable such as ``guo4``), carrying
a leading dialect/language tag into every chunk, and the short equal-power cross-fade that joins
the chunks' audio.
Does not own: generation (each chunk is an ordinary clone request with the same prompt bundle).

A text that fits in one chunk is returned unchanged, so short requests see byte-identical prompts.
"""

from __future__ import annotations

import re

import numpy as np

from core.edit_options import LANGUAGE_TAGS

# A sentence ends after . ! ? ; or an ellipsis followed by space, or right after a CJK stop
# (full-width punctuation is not followed by a space); closing quotes/brackets stay attached.
_SENTENCE_END = re.compile(r"(?:[.!?;…]+[\"'’”)\]]*(?=\s)|[。！？；…]+[\"'’”」』）)\]]*)\s*")
_CLAUSE_END = re.compile(r"(?:[,:，、：]+(?=\s)|[，、：]+)\s*")


def _split_keep(text: str, pattern: re.Pattern) -> list[str]:
    pieces, start = [], 0
    for m in pattern.finditer(text):
        if m.end() > start:
            pieces.append(text[start:m.end()])
            start = m.end()
    if start < len(text):
        pieces.append(text[start:])
    return [p for p in pieces if p.strip()]


# What a hard split never cuts through: a bracketed tag (``[clears throat]``), a pinyin syllable
# with its tone digit (``guo4``, so ``guo4guo4`` may be cut between the two), any other run of
# non-CJK characters (a word), each with the whitespace after it; a CJK character stands alone.
_ATOM = re.compile(r"\[[^\[\]\n]{1,40}\]\s*|[A-Za-z]{1,6}[1-5]\s*|[^\s\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef]+\s*"
                   r"|\S\s*|\s+")


def _hard_split(piece: str, max_chars: int) -> list[str]:
    """Split an over-long clause between words, tags, pinyin syllables or CJK characters; an atom
    longer than ``max_chars`` is cut every ``max_chars`` characters."""
    out, current = [], ""
    for atom in _ATOM.findall(piece):
        while len(atom) > max_chars:
            if current:
                out.append(current)
                current = ""
            out.append(atom[:max_chars])
            atom = atom[max_chars:]
        if len(current) + len(atom) > max_chars and current:
            out.append(current)
            current = ""
        current += atom
    if current.strip():
        out.append(current)
    return out


def _units(text: str, max_chars: int) -> list[str]:
    units = []
    for sentence in _split_keep(text, _SENTENCE_END):
        if len(sentence) <= max_chars:
            units.append(sentence)
            continue
        for clause in _split_keep(sentence, _CLAUSE_END):
            units.extend([clause] if len(clause) <= max_chars else _hard_split(clause, max_chars))
    return units


def split_text(text: str, max_chars: int) -> list[str]:
    """Chunks of at most ``max_chars`` characters (plus a carried language tag), in order.

    Sentences are packed greedily; a sentence longer than ``max_chars`` is split at clause
    punctuation, then at spaces, then anywhere. A leading tag such as ``[Cantonese]`` applies to
    the whole text, so it is repeated at the start of every chunk. Joining the chunks (ignoring
    the repeated tags and whitespace at the cuts) gives back the text. Never returns an empty list.

    Raises:
        ValueError: ``max_chars`` < 1.
    """
    if max_chars < 1:
        raise ValueError(f"max_chars must be at least 1, not {max_chars}")
    if len(text) <= max_chars:
        return [text]
    tag = next((t for t in LANGUAGE_TAGS if text.lstrip().startswith(t)), "")
    body = text.lstrip()[len(tag):] if tag else text
    chunks, current = [], ""
    for unit in _units(body, max_chars):
        if current and len((current + unit).strip()) > max_chars:
            chunks.append(current)
            current = ""
        current += unit
    if current.strip():
        chunks.append(current)
    chunks = [tag + c.strip() if tag else c.strip() for c in chunks if c.strip()]
    return chunks or [text]   # only a tag and whitespace: nothing to split, but never no chunk


def crossfade_join(pieces: list[np.ndarray], sample_rate: int, fade_ms: float = 30.0) -> np.ndarray:
    """Join float32 [N] pieces with an equal-power cross-fade of ``fade_ms`` at each seam.

    Each seam overlaps ``min(fade, len(left), len(right))`` samples, so the result is
    ``sum(len) - sum(overlaps)`` samples long.
    """
    if not pieces:
        return np.zeros(0, dtype=np.float32)
    out = np.asarray(pieces[0], dtype=np.float32)
    fade = int(round(sample_rate * fade_ms / 1000.0))
    for piece in pieces[1:]:
        piece = np.asarray(piece, dtype=np.float32)
        n = min(fade, len(out), len(piece))
        if n == 0:
            out = np.concatenate([out, piece])
            continue
        t = (np.arange(n, dtype=np.float32) + 0.5) / n
        fade_out, fade_in = np.cos(t * np.pi / 2), np.sin(t * np.pi / 2)
        seam = out[-n:] * fade_out + piece[:n] * fade_in
        out = np.concatenate([out[:-n], seam, piece[n:]])
    return out.astype(np.float32)


def split_units(text: str, max_chars: int) -> list[str]:
    """``text``'s sentences in order, each at most ``max_chars`` characters: a longer sentence is cut at
    clause punctuation, then between words, tags, pinyin syllables or CJK characters (what
    ``productions`` makes one segment of each). Joining them gives back the text.

    Raises:
        ValueError: ``max_chars`` < 1.
    """
    if max_chars < 1:
        raise ValueError(f"max_chars must be at least 1, not {max_chars}")
    return _units(text, max_chars)
