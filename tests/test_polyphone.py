"""Polyphone control: pinyin with a tone digit (``guo4``) in place of a Chinese character reaches the
model unchanged.

Covers: long-text chunking (llm.longform.split_text) never cuts a pinyin syllable or a tag, the
preview's sentence splitting does not either, the preview keeps pinyin in what it says, request
validation leaves the text as it is, the Step-Audio clone prompt carries it verbatim (real tiny
BPE tokenizer), and the HTTP API speaks it without an unknown-tag warning.
"""

import re

import httpx
import pytest
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from llm.longform import split_text
from preview.text import prepare, split_sentences
from testkit.paths import ROOT
from tts_engine.contract import validate_text

EXAMPLE = "我也想guo4guo4guo1儿guo4guo4的生活"
SYLLABLE = re.compile(r"[a-z]{1,6}[1-5]")

_pieces = st.sampled_from(["guo4", "zhong1", "chang2", "le5", "我", "也", "想", "儿", "的", "生", "活", "，", "。",
                           "[Laughter]", "[clears throat]", " "])


@hyp_settings(max_examples=150, deadline=None)
@given(st.lists(_pieces, min_size=1, max_size=60), st.integers(min_value=15, max_value=40))
def test_chunking_never_cuts_a_pinyin_syllable_or_a_tag(pieces, width):
    text = "".join(pieces)
    chunks = split_text(text, width)
    assert "".join(chunks).replace(" ", "") == text.replace(" ", "")
    atoms = re.compile(r"\[[^\]]+\]|[a-z]{1,6}[1-5]")
    assert [a for chunk in chunks for a in atoms.findall(chunk)] == atoms.findall(text)


def test_the_readme_example_chunks_between_syllables():
    chunks = split_text(EXAMPLE * 3, 9)
    assert all(len(c) <= 9 for c in chunks)
    assert all(SYLLABLE.fullmatch(s) for c in chunks for s in re.findall(r"[a-z]+\d?", c))


def test_preview_keeps_pinyin_and_splits_between_syllables():
    spoken = prepare(EXAMPLE)
    assert spoken.text == EXAMPLE and spoken.voice == "cmn" and not spoken.removed_tags
    pieces = split_sentences(EXAMPLE * 3, 10)
    assert "".join(pieces) == EXAMPLE * 3
    assert all(SYLLABLE.fullmatch(s) for p in pieces for s in re.findall(r"[a-z]+\d?", p))


def test_validation_passes_the_text_through():
    assert validate_text(EXAMPLE, "target text", 1000) is EXAMPLE


def test_clone_prompt_carries_pinyin_verbatim(tmp_path):
    from llm.prompts import clone_prompt_ids
    from testkit.tiny_models import build_tiny_tokenizer

    tok = build_tiny_tokenizer(tmp_path / "tok")
    encode = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    ids = clone_prompt_ids(encode, "clone_0123456789abcdef", "Hello.", "<audio_1><audio_2>", EXAMPLE)
    assert EXAMPLE in tok.decode(ids)


@pytest.mark.slow
def test_api_speaks_pinyin_without_a_tag_warning(tmp_path):
    from testkit.studio_server import start_studio

    studio = start_studio(tmp_path)
    try:
        with httpx.Client(base_url=studio.url, timeout=120) as http:
            voice = http.post("/v1/audio/voices", files={"file": ("v.flac", (ROOT / "examples/en_low.flac").read_bytes())},
                              data={"transcript": "The quiet harbour woke slowly as the first boats went out."}).json()
            r = http.post("/v1/audio/speech", json={"input": EXAMPLE, "voice": voice["id"], "response_format": "wav"})
            assert r.status_code == 200, r.text
            assert "x-warning" not in r.headers
            r = http.post("/v1/audio/speech", json={"input": EXAMPLE + "[laughter]", "voice": voice["id"],
                                                    "response_format": "wav"})
            assert r.status_code == 200 and "did you mean [Laughter]" in r.headers["x-warning"]
    finally:
        studio.stop()
