"""Text that arrives in pieces (an LLM's tokens) -> segments that can be spoken as soon as they are safe.

Owns: ``TextSegmenter`` (push deltas, get ``Segment`` s back in order) and its cutting rules; the
``Segment`` value type (its index, its slice of the session's text, what is spoken, why it was cut).
Does not own: speaking the segments (``web/api_stream_ws.py`` hands each to the engine's streaming path),
the whole-text splitter (``llm/longform.py``, whose punctuation and atom rules this file shares).

Rules, in order of preference:
    sentence  after ``. ! ? ; …`` followed by whitespace, or after ``。！？；…`` (no space needed), with
              closing quotes and brackets kept on the left; always cut.
    clause    after ``, :`` followed by whitespace, or after ``，、：``; cut only once the piece is at least
              ``clause_min_chars`` long (short clauses alone sound choppy).
    length    a piece longer than ``max_chars`` (the engine's text chunk) is cut at its last clause end,
              else its last word, tag or CJK character within the limit.
    wait      text that waited ``max_wait_s`` since its first character arrived is cut at its last clause
              end, else its last complete word (see :meth:`TextSegmenter.due`).
    flush     everything pending (the client's flush or close).

A cut is *safe* only when what follows it is known: a punctuation mark at the very end of the text so far
waits for the next character (``3.`` may become ``3.14``, ``。`` may be followed by ``”``); a bracketed tag
(``[Laughter]``, also while still open: ``[clears thr``) and a pinyin syllable with its tone digit
(``guo4``) are never cut; the last word of the text so far is never cut off by a wait (it may still grow).
A piece without a letter or digit (``...``) is not a segment of its own: it stays with the text after it.
A leading language tag (``[Cantonese]``) applies to the whole session, so it is repeated at the start of
every later segment's spoken text, as ``llm.longform.split_text`` does for chunks.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

from core.edit_options import LANGUAGE_TAGS, TAG_PATTERN
from core.errors import InputError
from llm.longform import _ATOM

_CLOSERS = "\"'’”」』）)]"
# The end of a sentence / clause and the spaces after it; group "ws" is the whitespace that proves an
# ASCII mark is an end (a CJK mark needs none).
_SENTENCE = re.compile(r"(?:[.!?;…]+[" + re.escape(_CLOSERS) + r"]*(?P<ws>\s+)|[。！？；…]+[" + re.escape(_CLOSERS)
                       + r"]*\s*)")
_CLAUSE = re.compile(r"(?:[,:]+(?P<ws>\s+)|[，、：]+\s*)")
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_ENDS = ".!?;…,:。！？；，、：]" + _CLOSERS
_TAG_MAX = 40        # TAG_PATTERN's longest tag body, characters
REASONS = ("sentence", "clause", "length", "wait", "flush")


@dataclass(frozen=True)
class Segment:
    """One piece of a session's text, in order.

    ``text`` is ``session_text[start:end]`` exactly (segments tile the text, so captions can be mapped back);
    ``spoken`` is what the engine is asked to say: ``text`` without surrounding whitespace, with the
    session's leading language tag carried in.
    """

    index: int
    text: str
    spoken: str
    start: int
    end: int
    reason: str

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(f"reason must be one of {', '.join(REASONS)}, not {self.reason!r}")


def _speakable(text: str) -> bool:
    return any(ch.isalnum() for ch in text)


def _open_tag_at(text: str) -> int | None:
    """Where an unclosed ``[`` that may still become a tag starts (None: there is none)."""
    start = text.rfind("[")
    if start < 0 or "]" in text[start:] or "\n" in text[start:] or len(text) - start > _TAG_MAX + 1:
        return None
    return start


def _inside_tag(text: str, pos: int) -> bool:
    return any(m.start() < pos < m.end() for m in TAG_PATTERN.finditer(text))


class TextSegmenter:
    """Cuts text that arrives in deltas into :class:`Segment` s (see the module docstring for the rules).

    Parameters:
        max_chars: longest segment (the engine's ``text_chunk_chars``, so a segment is one LLM request).
        clause_min_chars: a clause end cuts only a piece at least this long.
        max_wait_s: pending text older than this is cut at its last safe place by :meth:`due`.
        max_total_chars: most characters the whole session may push.

    Not thread-safe: one session's receiver owns it. Times are the caller's clock (``time.monotonic()``).
    """

    def __init__(self, max_chars: int, clause_min_chars: int = 60, max_wait_s: float = 1.5,
                 max_total_chars: int = 1_000_000) -> None:
        if max_chars < 1 or clause_min_chars < 0 or max_wait_s <= 0:
            raise ValueError("need max_chars >= 1, clause_min_chars >= 0 and max_wait_s > 0")
        self.max_chars, self.clause_min_chars, self.max_wait_s = max_chars, clause_min_chars, max_wait_s
        self.max_total_chars = max_total_chars
        self._text = ""              # the whole session's text so far
        self._cut = 0                # offset where the pending text starts
        self._index = 0
        self._arrivals: list[tuple[int, float]] = []   # (end offset of a delta, when it arrived)
        self._stalled = False        # a wait found nothing to cut: no deadline until more text arrives
        self._waited_until = float("-inf")   # the last wait cut: the rest's wait starts then, not earlier
        self._language_tag = ""

    # ------------------------------------------------------------------ public

    @property
    def text(self) -> str:
        """Everything pushed so far."""
        return self._text

    @property
    def pending(self) -> str:
        """Text received but not yet part of a segment."""
        return self._text[self._cut:]

    @property
    def deadline(self) -> float | None:
        """When :meth:`due` will cut the pending text (None: nothing waits)."""
        if self._stalled or not _speakable(self.pending):
            return None
        return max(self._arrival(self._cut), self._waited_until) + self.max_wait_s

    def push(self, delta: str, now: float) -> list[Segment]:
        """Add ``delta``; returns the segments it completes (often none).

        Raises:
            InputError: the session's text would exceed ``max_total_chars``.
        """
        if len(self._text) + len(delta) > self.max_total_chars:
            raise InputError(f"the session's text would be {len(self._text) + len(delta)} characters; the limit "
                             f"is {self.max_total_chars} (setting ws_max_session_chars)")
        if not delta:
            return []
        self._text += delta
        self._arrivals.append((len(self._text), now))
        self._stalled = False
        if not self._language_tag:
            head = self._text.lstrip()
            self._language_tag = next((t for t in LANGUAGE_TAGS if head.startswith(t)), "")
        return self._drain()

    def due(self, now: float) -> list[Segment]:
        """The segments the maximum wait forces at ``now`` (call it at :attr:`deadline`)."""
        out = self._drain()
        deadline = self.deadline
        if deadline is None or now < deadline:
            return out
        pending = self.pending
        end = self._last_clause_end(pending, len(pending)) or self._last_word_end(pending, final=False)
        if end and _speakable(pending[:end]):
            out.append(self._emit(end, "wait"))
            self._waited_until = now
            out += self._drain()
        else:
            self._stalled = True
        return out

    def flush(self) -> list[Segment]:
        """Everything pending as segments (a piece without words is dropped)."""
        out = self._drain()
        pending = self.pending
        while pending:
            end = len(pending) if len(pending) <= self.max_chars else self._length_cut(pending, final=True)
            if _speakable(pending[:end]):
                out.append(self._emit(end, "flush"))
            else:
                self._cut += end        # punctuation or spaces alone: nothing to say
            pending = self.pending
        return out

    # ------------------------------------------------------------------ cutting

    def _drain(self) -> list[Segment]:
        out = []
        while True:
            pending = self.pending
            cut = self._first_safe_cut(pending)
            if cut is None:
                if len(pending) > self.max_chars:
                    end = self._length_cut(pending, final=False)
                    if end:
                        out.append(self._emit(end, "length"))
                        continue
                return out
            end, reason = cut
            out.append(self._emit(end, reason))

    def _first_safe_cut(self, pending: str) -> tuple[int, str] | None:
        """The first sentence end (or long-enough clause end) whose piece has words, within max_chars."""
        limit = _open_tag_at(pending)
        candidates = []
        for pattern, reason in ((_SENTENCE, "sentence"), (_CLAUSE, "clause")):
            for m in pattern.finditer(pending):
                end = m.end()
                if end >= len(pending) and not m.groupdict().get("ws"):
                    continue     # a CJK mark at the very end: a closing quote may follow
                if limit is not None and m.start() > limit:
                    continue
                if _inside_tag(pending, m.start()):
                    continue
                if reason == "clause" and len(pending[:m.start()].strip()) < self.clause_min_chars:
                    continue
                candidates.append((end, reason))
        for end, reason in sorted(candidates):
            if end > self.max_chars:
                return None
            if _speakable(pending[:end]):
                return end, reason
        return None

    def _last_clause_end(self, pending: str, within: int) -> int:
        limit = _open_tag_at(pending)
        best = 0
        for pattern in (_SENTENCE, _CLAUSE):
            for m in pattern.finditer(pending):
                if m.end() <= within and (limit is None or m.start() < limit) and not _inside_tag(pending, m.start()):
                    if m.end() < len(pending) or m.groupdict().get("ws"):
                        best = max(best, m.end())
        return best if _speakable(pending[:best]) else 0

    def _last_word_end(self, pending: str, final: bool, within: int | None = None) -> int:
        """The end of the last complete atom (word with its spaces, tag, pinyin syllable, CJK character)
        at or before ``within``; the text's last atom counts only if ``final`` or it is surely complete."""
        limit = _open_tag_at(pending)
        if limit is not None:
            pending = pending[:limit]
        ends, pos = [], 0
        for atom in _ATOM.findall(pending):
            pos += len(atom)
            ends.append(pos)
        if not ends:
            return 0
        last = pending[ends[-2] if len(ends) > 1 else 0:]
        # A word that ends in punctuation is over (at worst "3." was to become "3.14": rare after a wait).
        complete = final or limit is not None or last[-1:].isspace() or last[-1:] in _ENDS \
            or bool(_CJK.fullmatch(last))
        if not complete:
            ends.pop()
        if within is not None:
            ends = [e for e in ends if e <= within]
        return ends[-1] if ends else 0

    def _length_cut(self, pending: str, final: bool) -> int:
        """Where an over-long piece is cut: its last clause end within max_chars, else its last word; an atom
        longer than max_chars (no space at all) is cut at max_chars."""
        end = self._last_clause_end(pending, self.max_chars) or \
            self._last_word_end(pending, final, within=self.max_chars)
        return end or min(self.max_chars, len(pending))

    def _emit(self, end: int, reason: str) -> Segment:
        start = self._cut
        text = self._text[start:start + end]
        self._cut = start + end
        spoken = text.strip()
        if self._language_tag and self._index > 0 and not spoken.startswith(self._language_tag):
            spoken = f"{self._language_tag}{spoken}"
        segment = Segment(self._index, text, spoken, start, start + end, reason)
        self._index += 1
        return segment

    def _arrival(self, offset: int) -> float:
        """When the character at ``offset`` arrived."""
        i = bisect.bisect_right([e for e, _ in self._arrivals], offset)
        return self._arrivals[min(i, len(self._arrivals) - 1)][1]
