"""Word times from the Paraformer's CIF weights (tokenizer/cif_timing.py, tokenizer/asr.py).

Covers: the CIF arithmetic on weights made by hand (where each token fires, what a silence does to a
span, the tail flush), and the tokenizer folder's Paraformer run through the studio's own chunk loop:
the text equals funasr's own ``generate`` on the same clip, every token the model emits gets a span
(the weights' fire count is checked against the model's own count inside the loop), and the words
come out in order, inside the clip. The tiny random-weight model hears nonsense, so a copy of its
folder gets a vocabulary of English words, or of Chinese characters, in place of its letters: the
model's ids are unchanged, the words are then many and the joining rules of both languages run.
How close the spans sit to real words is for the real checkpoint (pending: it cannot be downloaded
here); ``tests/test_quality.py`` checks timing accuracy with a real recogniser.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from core.audio_io import Audio, load_audio, resample
from core.settings import FUNASR_SUBDIR
from testkit.paths import FIXTURES
from tokenizer.asr import CHUNK_SIZE, DECODER_LOOK_BACK, ENCODER_LOOK_BACK, Transcriber
from tokenizer.cif_timing import cif_token_spans

FOLDER = FIXTURES / "tokenizer" / "Step-Audio-Tokenizer" / FUNASR_SUBDIR
CLIPS = (FIXTURES / "prompt_22k.wav", FIXTURES.parent.parent / "examples" / "en_low.flac")


# ----------------------------------------------------------------------------- the arithmetic

def test_tokens_fire_where_the_weights_reach_the_threshold():
    # Two frames of silence, a token over frames 2-3, a silent gap with a trickle, a token over 7-9.
    alphas = np.array([0, 0, 0.5, 0.5, 0.01, 0.01, 0, 0.4, 0.4, 0.2, 0.0], np.float32)
    spans = cif_token_spans(alphas, np.arange(len(alphas)), 1.0, 0.06)
    assert len(spans) == 2
    assert spans[0].start_s == pytest.approx(0.12) and spans[0].end_s == pytest.approx(0.24)
    # The trickle (under 5 % of a token) belongs to the second token but does not move its start; with
    # it the token needs 0.98 more, reached 0.18 / 0.2 of the way into frame 9.
    assert spans[1].start_s == pytest.approx(0.42) and spans[1].end_s == pytest.approx(0.54 + 0.9 * 0.06, abs=1e-6)


def test_a_fire_inside_a_frame_splits_it():
    alphas = np.array([0.6, 0.6, 0.6, 0.2], np.float32)     # fires in frame 1 (0.4 of its 0.6), frame 3
    spans = cif_token_spans(alphas, np.arange(4), 1.0, 0.06)
    assert len(spans) == 2
    cut = 0.06 + 0.06 * (0.4 / 0.6)
    assert spans[0].end_s == pytest.approx(cut, abs=1e-6) and spans[1].start_s == pytest.approx(cut, abs=1e-6)
    assert spans[1].end_s == pytest.approx(0.24)


def test_the_tail_flushes_a_last_partial_token():
    alphas = np.array([0.3, 0.3, 0.0, 0.0], np.float32)
    frames = np.arange(-1, 3)                                  # the first frame is padding before the clip
    assert cif_token_spans(alphas, frames, 1.0, 0.06) == []    # 0.6 never reaches the threshold...
    (span,) = cif_token_spans(alphas, frames, 1.0, 0.06, tail=0.45)   # ...the tail completes it
    assert span.start_s == 0.0 and span.end_s == pytest.approx(0.06)   # padding time clamps to 0
    assert cif_token_spans(alphas, frames, 1.0, 0.06, tail=0.3) == []  # 0.9: still short


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="equal length"):
        cif_token_spans(np.zeros(3), np.arange(4), 1.0, 0.06)


# ----------------------------------------------------------------------------- the Paraformer

def _generate_text(transcriber: Transcriber, audio: Audio) -> str:
    """funasr's own streaming ``generate`` on the same samples: the reference for the text."""
    samples = np.ascontiguousarray(resample(audio.samples, audio.sample_rate, 16000), dtype=np.float32)
    out = transcriber._model().generate(input=samples, cache={}, is_final=True, chunk_size=list(CHUNK_SIZE),
                                        encoder_chunk_look_back=ENCODER_LOOK_BACK,
                                        decoder_chunk_look_back=DECODER_LOOK_BACK, disable_pbar=True)
    return " ".join(str(out[0].get("text", "")).split())


def _cuts(clip) -> list[Audio]:
    audio = load_audio(clip)
    x = resample(audio.samples, audio.sample_rate, 16000)
    # Whole; ending mid-chunk; ending in a final chunk too short for the frontend (the tail path).
    return [audio, Audio(x[:16000 * 2 + 500], 16000), Audio(x[:9600 * 3 + 100], 16000)]


def _check_words(transcript, duration: float) -> None:
    assert transcript.timed and transcript.words
    starts = [w.start_s for w in transcript.words]
    assert starts == sorted(starts)
    for w in transcript.words:
        assert 0.0 <= w.start_s <= w.end_s <= duration + 1e-6


@pytest.fixture(scope="module")
def transcriber():
    return Transcriber(FOLDER)


@pytest.mark.parametrize("clip", CLIPS, ids=lambda p: p.name)
def test_the_text_is_funasrs_and_every_token_is_timed(transcriber, clip):
    for audio in _cuts(clip):
        transcript = transcriber.transcribe(audio)
        assert transcript.text == _generate_text(transcriber, audio)
        _check_words(transcript, audio.duration)
        # The tiny model's vocabulary is letters, which funasr joins into one "abbreviation" word.
        assert "".join(w.text for w in transcript.words) == transcript.text.replace(" ", "")


def _with_vocabulary(tmp_path, make) -> Transcriber:
    folder = tmp_path / "asr"
    shutil.copytree(FOLDER, folder)
    tokens = json.loads((folder / "tokens.json").read_text())
    specials = {"<blank>", "<s>", "</s>", "<unk>", "@@"}
    renamed = [t if t in specials else make(i) for i, t in enumerate(tokens)]
    (folder / "tokens.json").write_text(json.dumps(renamed, ensure_ascii=False))
    return Transcriber(folder)


def test_english_words_each_get_a_span(tmp_path):
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo",
             "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango", "uniform", "victor",
             "whiskey", "xray", "yankee", "zulu", "one", "two", "three", "four", "five"]
    transcriber = _with_vocabulary(tmp_path, lambda i: words[i])
    audio = load_audio(CLIPS[1])
    transcript = transcriber.transcribe(audio)
    assert transcript.text == _generate_text(transcriber, audio)
    _check_words(transcript, audio.duration)
    assert [w.text for w in transcript.words] == transcript.text.split()
    assert len(transcript.words) > 5
    # Later words are heard later: the spans follow the clip, not one shared span.
    assert transcript.words[-1].start_s > transcript.words[0].end_s


def test_chinese_characters_each_get_a_span(tmp_path):
    transcriber = _with_vocabulary(tmp_path, lambda i: chr(0x4E00 + 7 * i))
    audio = load_audio(CLIPS[0])
    transcript = transcriber.transcribe(audio)
    assert transcript.text == _generate_text(transcriber, audio)
    _check_words(transcript, audio.duration)
    assert all(len(w.text) == 1 for w in transcript.words)
    assert "".join(w.text for w in transcript.words) == transcript.text.replace(" ", "")
