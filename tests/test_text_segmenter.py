"""tts_engine/text_segmenter.py: text that arrives in deltas -> segments, cut as soon as they are safe.

Covers: segments tile the text and do not depend on how it was split into deltas (any split, hypothesis);
sentence ends (ASCII needs the following space, CJK marks do not, closing quotes stay left); decimal points;
clause ends only past clause_min_chars; tags and pinyin syllables never cut (also a tag still open); the
length cut at max_chars; the maximum wait (cuts at the last complete word, never a word still growing, and
restarts for the rest); pieces without words stay with the next segment; the carried language tag; the
session text limit; flush.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import InputError
from tts_engine.text_segmenter import TextSegmenter

TEXT = ("Hello there. How are you today? Pi is 3.14, roughly. [Laughter] That was funny! "
        "你好。今天天气怎么样？我们去中国(guo2)吧，好吗？ \"Quoted.\" Last words")


def run(text: str, sizes=(3,), **kw) -> list:
    seg = TextSegmenter(kw.pop("max_chars", 300), **kw)
    out, pos, i, now = [], 0, 0, 0.0
    while pos < len(text):
        n = sizes[i % len(sizes)]
        out += seg.push(text[pos:pos + n], now)
        pos, i, now = pos + n, i + 1, now + 0.001
    return out + seg.flush()


def test_sentences_are_cut_and_tile_the_text():
    segments = run(TEXT)
    assert "".join(s.text for s in segments) == TEXT
    assert [s.index for s in segments] == list(range(len(segments)))
    assert all(a.end == b.start for a, b in zip(segments, segments[1:]))
    assert [s.spoken for s in segments] == [
        "Hello there.", "How are you today?", "Pi is 3.14, roughly.", "[Laughter] That was funny!", "你好。",
        "今天天气怎么样？", "我们去中国(guo2)吧，好吗？", "\"Quoted.\"", "Last words"]
    assert segments[-1].reason == "flush" and {s.reason for s in segments[:-1]} == {"sentence"}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 9), min_size=1, max_size=12))
def test_segments_do_not_depend_on_how_the_text_was_split(sizes):
    assert [(s.text, s.reason) for s in run(TEXT, tuple(sizes))] == [(s.text, s.reason) for s in run(TEXT, (len(TEXT),))]


def test_a_mark_at_the_end_waits_for_the_next_character():
    seg = TextSegmenter(300)
    assert seg.push("Pi is 3.", 0.0) == []           # could become 3.14
    assert seg.push("14 and done.", 0.0) == []       # a final mark needs the space after it
    assert [s.text for s in seg.push(" Next", 0.0)] == ["Pi is 3.14 and done. "]
    assert seg.push("他说：“好。", 0.0) == []          # a closing quote may follow a CJK stop
    assert [s.text for s in seg.push("”然后", 0.0)] == ["Next他说：“好。”"]


def test_clause_ends_cut_only_long_pieces():
    text = "one, two, three, four, five, six, seven, eight, nine, ten"
    assert [s.text for s in run(text, clause_min_chars=100)] == [text]
    cut = run(text, clause_min_chars=20)
    assert [s.text for s in cut][:2] == ["one, two, three, four, ", "five, six, seven, eight, "]
    assert cut[0].reason == "clause"
    assert [s.text for s in run("一，二，三，四，五，六，七，八", clause_min_chars=3)][:2] == ["一，二，", "三，四，"]


def test_tags_and_pinyin_are_never_cut():
    seg = TextSegmenter(300, max_wait_s=1.0)
    assert seg.push("Oh [clears. throat", 0.0) == []       # a full stop inside a tag still open
    assert seg.due(5.0)[0].text == "Oh "                    # the wait stops before the open tag
    assert seg.push("] Right. ", 5.0)[0].text == "[clears. throat] Right. "
    seg = TextSegmenter(300, max_wait_s=1.0)
    seg.push("我们去中国guo", 0.0)
    assert [s.text for s in seg.due(2.0)] == ["我们去中国"]   # "guo" may still get its tone digit
    seg.push("2吧", 2.1)
    assert [s.text for s in seg.due(9.0)] == ["guo2吧"]
    assert [s.text for s in run("[Laughter][Laughter] yes " * 20, max_chars=30)][0] == "[Laughter][Laughter] yes "


def test_over_long_text_is_cut_at_words_within_max_chars():
    text = "word " * 100
    segments = run(text, max_chars=42)
    assert "".join(s.text for s in segments) == text
    assert all(len(s.text) <= 42 and s.text.endswith(" ") for s in segments)
    assert {s.reason for s in segments[:-1]} == {"length"}
    assert [len(s.text) for s in run("x" * 100, max_chars=40)] == [40, 40, 20]   # no space at all


def test_the_wait_cuts_at_the_last_complete_word_then_restarts():
    seg = TextSegmenter(300, max_wait_s=1.0)
    assert seg.push("Hello world how are", 0.0) == [] and seg.deadline == 1.0
    assert seg.due(0.9) == []
    first = seg.due(1.0)
    assert [(s.text, s.reason) for s in first] == [("Hello world how ", "wait")]
    assert seg.pending == "are" and seg.deadline == 2.0     # the rest waits anew from the cut
    seg.push(" you", 1.5)
    assert [s.text for s in seg.due(2.0)] == ["are "]
    seg.push(", fine", 2.1)
    assert [s.text for s in seg.due(3.1)] == ["you, "]       # a clause end beats the last word
    assert seg.due(10.0) == [] and seg.deadline is None      # "fine" may still grow: nothing to cut, no spin
    assert seg.push("!", 10.0) == [] and seg.due(11.0)[0].text == "fine!"


def test_pieces_without_words_stay_with_the_next_segment():
    segments = run("... ?! Hello there. ... ")
    assert [s.text for s in segments] == ["... ?! Hello there. "]   # the trailing dots alone are dropped
    assert segments[0].spoken == "... ?! Hello there."


def test_a_leading_language_tag_is_carried_into_every_segment():
    segments = run("[Cantonese]你好。今日天氣好好。 Bye.")
    assert [s.spoken for s in segments] == ["[Cantonese]你好。", "[Cantonese]今日天氣好好。", "[Cantonese]Bye."]
    assert segments[1].text == "今日天氣好好。 "


def test_session_text_limit():
    seg = TextSegmenter(300, max_total_chars=10)
    seg.push("12345", 0.0)
    with pytest.raises(InputError, match="limit is 10"):
        seg.push("678901", 0.0)
    assert seg.text == "12345"
