"""Tags and instructions (core.edit_options, core.instructions).

Covers: the 2026-01 paralinguistic tags next to the ten of 2025, the unknown-tag warning (names the
unknown tags, suggests the right case, lists the known ones, never refuses), the Chinese names
(each a real option, none ambiguous), and free-form instructions mapped to edit chains in English
and Chinese, with repeat counts, limits, the 400-style message and the ASCII header form.
"""

import json

import pytest

from core.edit_options import (CHINESE_NAMES, EDIT_TYPES, LANGUAGE_TAGS, PARALINGUISTIC_TAGS,
                               PARALINGUISTIC_TAGS_2025, tag_warning, unknown_tags)
from core.errors import InputError
from core.instructions import MAX_CHAIN_STEPS, EditStep, chain_header, parse_instructions
from testkit.paths import FIXTURES

# As the 2026-01 release names them (the list), written out here by hand.
NEW_2026 = ["[exhale]", "[snort]", "[inhale]", "[chuckle]", "[clears throat]", "[giggle]", "[cough]", "[breath]",
            "[Surprise-yo]", "[Question-ah]", "[Question-en]", "[Question-yi]", "[Question-oh]"]


def test_tag_lists_hold_the_2025_tags_of_the_golden_prompts_and_the_2026_additions():
    golden = json.loads((FIXTURES / "prompts.json").read_text())["paralinguistic_tags"]
    assert list(PARALINGUISTIC_TAGS_2025) == golden
    assert list(PARALINGUISTIC_TAGS) == golden + NEW_2026
    assert len(set(PARALINGUISTIC_TAGS)) == 23


@pytest.mark.parametrize("text", ["That was [Laughter] fun [clears throat] sorry.", "[Cantonese]你好[Question-yi]",
                                  "我也想guo4guo4guo1儿guo4guo4的生活", "no tags at all", ""])
def test_known_tags_and_pinyin_draw_no_warning(text):
    assert unknown_tags(text) == () and tag_warning(text) == ""


def test_unknown_tags_are_named_with_a_case_hint_and_the_known_list():
    text = "Well [laughter] that [Snore] was [laughter] odd."
    assert unknown_tags(text) == ("[laughter]", "[Snore]")
    warning = tag_warning(text)
    assert "[laughter] (did you mean [Laughter]?)" in warning and "[Snore]" in warning
    assert "[Snore] (did you mean" not in warning
    for tag in PARALINGUISTIC_TAGS + LANGUAGE_TAGS:
        assert tag in warning
    assert "read them as text" in warning


def test_chinese_names_name_real_options_once_each():
    names = [name for values in CHINESE_NAMES.values() for name in values]
    assert len(names) == len(set(names))
    for (kind, option) in CHINESE_NAMES:
        assert kind in EDIT_TYPES and (option in EDIT_TYPES[kind] or (option == "" and not EDIT_TYPES[kind]))
    # Every emotion, style and speed option can be said in Chinese.
    for kind in ("emotion", "style", "speed"):
        assert {o for k, o in CHINESE_NAMES if k == kind} == set(EDIT_TYPES[kind])


@pytest.mark.parametrize("text, chain", [
    ("whisper, sad, a bit slower", [("style", "whisper"), ("emotion", "sad"), ("speed", "slower")]),
    ("耳语，难过，慢一点", [("style", "whisper"), ("emotion", "sad"), ("speed", "slower")]),
    ("in a whispering voice and much faster", [("style", "whisper"), ("speed", "more faster")]),
    ("whisper x2; remove noise", [("style", "whisper"), ("style", "whisper"), ("denoise", None)]),
    ("开心，快很多，降噪", [("emotion", "happy"), ("speed", "more faster"), ("denoise", None)]),
    ("耳语两次", [("style", "whisper"), ("style", "whisper")]),
    ("快乐", [("emotion", "happy")]),   # 快 (fast) inside 快乐 (happy) is not a speed
    ("more slower, neutral, act coy, remove silence",
     [("speed", "more slower"), ("emotion", "remove"), ("style", "act_coy"), ("vad", None)]),
    ("Sound a little ANGRIER, then story", [("emotion", "angry"), ("style", "story")]),
])
def test_instructions_become_edit_chains(text, chain):
    assert [(s.edit_type, s.edit_info) for s in parse_instructions(text)] == chain


@pytest.mark.parametrize("text", [None, "", " ,， "])
def test_empty_instructions_are_no_edits(text):
    assert parse_instructions(text) == ()


def test_an_unmappable_clause_is_quoted_and_the_message_lists_what_is_understood():
    with pytest.raises(InputError) as err:
        parse_instructions("whisper, sing like an opera star")
    message = str(err.value)
    assert "'sing like an opera star'" in message
    for word in ("whisper", "happy", "much slower", "remove silence", "开心", "x2"):
        assert word in message


def test_chain_limits():
    with pytest.raises(InputError, match="at most 5"):
        parse_instructions("whisper x6")
    with pytest.raises(InputError, match=f"at most {MAX_CHAIN_STEPS}"):
        parse_instructions("whisper x5, sad x4")
    with pytest.raises(InputError, match="characters long"):
        parse_instructions("sad, " * 200)


def test_chain_header_is_ascii_and_reads_back():
    from urllib.parse import unquote

    steps = parse_instructions("耳语，非常慢，降噪")
    header = chain_header(steps)
    header.encode("ascii")
    assert header == "style:whisper,speed:more%20slower,denoise"
    assert [unquote(part) for part in header.split(",")] == [s.label for s in steps]
    assert EditStep("vad").label == "vad"
