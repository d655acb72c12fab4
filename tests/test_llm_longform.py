"""llm.longform: sentence splitting for long target text and the cross-fade join."""

import numpy as np
import pytest

from llm.longform import crossfade_join, split_text


def _squash(text):
    return "".join(text.split())


def test_short_text_is_returned_verbatim():
    assert split_text("  Hello world.\t", 100) == ["  Hello world.\t"]


def test_english_sentences_are_packed_under_the_limit():
    text = "First sentence here. Second one is here! Is this the third? Yes; and a fourth."
    chunks = split_text(text, 40)
    assert all(len(c) <= 40 for c in chunks)
    assert len(chunks) >= 2
    assert chunks[0] == "First sentence here. Second one is here!"
    assert _squash("".join(chunks)) == _squash(text)
    # Cuts fall after sentence punctuation, never mid-word.
    assert all(c.rstrip()[-1] in ".!?;" for c in chunks)


def test_chinese_punctuation_splits_without_spaces():
    text = "今天天气很好。我们去公园散步吧！你觉得怎么样？好的，我们走吧。"
    chunks = split_text(text, 12)
    assert chunks == ["今天天气很好。", "我们去公园散步吧！", "你觉得怎么样？", "好的，我们走吧。"]


def test_decimal_points_do_not_split():
    chunks = split_text("It costs 3.50 dollars today. " * 3, 40)
    assert all("3.50" in c for c in chunks)


def test_language_tag_is_carried_into_every_chunk():
    text = "[Cantonese]第一句话在这里。第二句话在这里。第三句话在这里。"
    chunks = split_text(text, 10)
    assert len(chunks) == 3
    assert all(c.startswith("[Cantonese]") for c in chunks)
    assert _squash("".join(c.replace("[Cantonese]", "") for c in chunks)) == _squash(text.replace("[Cantonese]", ""))


@pytest.mark.parametrize("text", ["[Cantonese]" + " " * 30, "word" + " " * 40 + "word"])
def test_blank_stretches_never_give_an_empty_chunk_list_or_blank_chunks(text):
    chunks = split_text(text, 10)   # the engine generates one answer per chunk; [] crashed it
    assert chunks and all(c.strip() for c in chunks)
    assert _squash("".join(chunks)) == _squash(text)


def test_over_long_sentence_falls_back_to_clauses_then_words():
    text = "one two three four five six seven eight nine ten, eleven twelve thirteen fourteen fifteen sixteen."
    chunks = split_text(text, 30)
    assert all(len(c) <= 30 for c in chunks)
    assert _squash("".join(chunks)) == _squash(text)
    assert split_text("x" * 25, 10) == ["x" * 10, "x" * 10, "x" * 5]
    with pytest.raises(ValueError):
        split_text("abc", 0)


def test_crossfade_join_length_and_seam():
    rate = 24000
    a, b = np.ones(2400, np.float32), np.ones(4800, np.float32)
    out = crossfade_join([a, b], rate, fade_ms=10)
    assert out.dtype == np.float32 and len(out) == 2400 + 4800 - 240
    # Equal-power fade of two equal constant signals: cos + sin >= 1 at the seam, never above sqrt(2).
    assert np.all(out[2160:2400] >= 0.999) and np.all(out[2160:2400] <= np.sqrt(2) + 1e-6)
    assert len(crossfade_join([a], rate)) == 2400 and len(crossfade_join([], rate)) == 0
    # A piece shorter than the fade overlaps only as far as it reaches.
    assert len(crossfade_join([a, np.ones(100, np.float32)], rate, fade_ms=10)) == 2400
