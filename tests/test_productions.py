"""productions: splitting, scripts and casts, SRT cues, captions and the renderer, without a server.

Covers: sentences and paragraphs in English and Chinese, tags and pinyin never cut, a language tag
carried into every segment, no segment over the limit; ``Name:`` / ``[S1]`` scripts, turns, the cast
check naming missing speakers; SRT parsing and its errors (bad timing, end before start, overlap, no
text); caption formats; the renderer's placement (pauses, cross-fades, cue targets), captions at the
take's exact samples, EBU R128 loudness reached (or the peak ceiling kept), every format decodable;
the streamed loudness equal to pyloudnorm's; a render never holding a copy of itself; any text (hypothesis)
answered with segments no longer than the limit or an InputError.
"""

from __future__ import annotations

import io

import numpy as np
import pyloudnorm
import pytest
import soundfile as sf

from core.audio_io import Audio
from core.errors import InputError
from productions.captions import to_srt, to_vtt
from productions.model import Caption
from productions.render import PEAK_CEILING, RENDER_FORMATS, RenderItem, render
from productions.script import check_cast, parse_script, speakers_of
from productions.splitting import split_segments
from productions.srt import Cue, parse_srt, speed_needed

RATE = 24000


# ----------------------------------------------------------------------------- splitting

def test_text_splits_at_sentences_and_paragraphs():
    pieces = split_segments("Hello there. How are you?\nFine!\n\nA new paragraph.", 300)
    assert [p.text for p in pieces] == ["Hello there.", "How are you?", "Fine!", "A new paragraph."]
    assert [p.paragraph_end for p in pieces] == [False, False, True, True]


def test_chinese_punctuation_splits_without_spaces():
    pieces = split_segments("今天天气很好。我们去公园吧！你觉得呢？", 300)
    assert [p.text for p in pieces] == ["今天天气很好。", "我们去公园吧！", "你觉得呢？"]


def test_tags_and_pinyin_are_never_cut_and_no_segment_is_too_long():
    text = ("This is a long sentence [Laughter] that goes on and on with [clears throat] tags inside and "
            "pinyin like guo4 and dian3 placed here and there until it must be cut somewhere")
    pieces = [p.text for p in split_segments(text, 40)]
    assert all(len(p) <= 40 for p in pieces)
    assert "".join(pieces).replace(" ", "") == text.replace(" ", "")
    joined = " | ".join(pieces)
    for atom in ("[Laughter]", "[clears throat]", "guo4", "dian3"):
        assert atom in joined and sum(atom in p for p in pieces) == 1


def test_a_language_tag_is_carried_into_every_segment():
    pieces = split_segments("[Cantonese]你好。我很好！", 300)
    assert [p.text for p in pieces] == ["[Cantonese]你好。", "[Cantonese]我很好！"]


def test_empty_text_is_refused():
    with pytest.raises(InputError, match="empty"):
        split_segments(" \n\n ", 300)


# ----------------------------------------------------------------------------- scripts

def test_scripts_with_names_and_speaker_tags():
    lines = parse_script("Alice: Hi. How are you?\n[S2] Fine, [Laughter] thanks.\nreally.\n\n老王：你好。", 300)
    assert [(l.speaker, l.text) for l in lines] == [
        ("Alice", "Hi."), ("Alice", "How are you?"), ("S2", "Fine, [Laughter] thanks."), ("S2", "really."),
        ("老王", "你好。")]
    assert [l.turn_end for l in lines] == [False, True, False, True, True]
    assert speakers_of(lines) == ["Alice", "S2", "老王"]


def test_a_tag_at_a_line_start_is_text_not_a_speaker():
    lines = parse_script("Bob: Well.\n[Laughter] That was fun.", 300)
    assert [(l.speaker, l.text) for l in lines] == [("Bob", "Well."), ("Bob", "[Laughter] That was fun.")]


def test_script_errors_name_the_problem():
    with pytest.raises(InputError, match="line 1 has no speaker"):
        parse_script("No speaker here.", 300)
    with pytest.raises(InputError, match="empty"):
        parse_script("", 300)
    with pytest.raises(InputError, match="no voice for 'Bob', 'Carol'"):
        check_cast(["Alice", "Bob", "Carol"], {"Alice": "a-1", "Bob": " "})
    assert check_cast(["Alice"], {"Alice": " a-1 ", "Zed": "z"}) == {"Alice": "a-1"}


# ----------------------------------------------------------------------------- SRT

def test_srt_cues_are_parsed_with_markup_removed():
    cues = parse_srt("\ufeff1\r\n00:00:01,000 --> 00:00:02,500\r\n<i>Hello</i>\r\nworld\r\n\r\n"
                     "2\r\n00:00:03.000 --> 00:00:04,000 X1:0\r\n{\\an8}Bye\r\n")
    assert [(c.start_ms, c.end_ms, c.text) for c in cues] == [(1000, 2500, "Hello world"), (3000, 4000, "Bye")]


@pytest.mark.parametrize("text, words", [
    ("1\n00:00:01,000 --> nonsense\nHi\n", "cue 1 (line 2): expected a timing line"),
    ("1\n00:00:02,000 --> 00:00:01,000\nHi\n", "not after it starts"),
    ("1\n00:00:01,000 --> 00:00:03,000\nHi\n\n2\n00:00:02,000 --> 00:00:04,000\nHo\n", "cue 2 (line 6) starts at 00:00:02,000, before cue 1 ends"),
    ("1\n00:00:01,000 --> 00:00:02,000\n<b></b>\n", "has no text"),
    ("1\n00:00:61,000 --> 00:01:02,000\nHi\n", "bad timestamp"),
    ("", "empty"),
])
def test_broken_srt_is_refused_with_the_cue_and_line(text, words):
    with pytest.raises(InputError, match=words.replace("(", r"\(").replace(")", r"\)")):
        parse_srt(text)


def test_speed_needed_picks_the_mildest_speed_edit():
    assert speed_needed(900, 1000) is None
    assert speed_needed(1150, 1000) == "faster"
    assert speed_needed(1400, 1000) == "more faster"
    assert speed_needed(5000, 1000) == "more faster"


# ----------------------------------------------------------------------------- captions

def test_caption_formats_carry_exact_times_and_speakers():
    caps = [Caption("seg-1", "Alice", "Hi -->\nthere", 0, 36012, RATE), Caption("seg-2", "", "a<b", 36012, 90_000_000, RATE)]
    srt = to_srt(caps)
    assert srt.splitlines()[:3] == ["1", "00:00:00,000 --> 00:00:01,501", "Alice: Hi -> there"]
    assert "00:00:01,501 --> 01:02:30,000\na<b" in srt
    vtt = to_vtt(caps)
    assert vtt.startswith("WEBVTT\n") and "00:00:00.000 --> 00:00:01.501\n<v Alice>Hi -&gt; there" in vtt
    assert "a&lt;b" in vtt


def test_timed_words_become_short_lines_with_word_tags():
    from core.transcript import Word

    text = "The quiet harbour woke slowly as the first boats went out to sea."
    words = tuple(Word(w, 2.0 + i * 0.4, 2.0 + i * 0.4 + 0.3) for i, w in enumerate(text.split()))
    caps = [Caption("seg-1", "Alice", text, 2 * RATE, int(7.5 * RATE), RATE, words),
            Caption("seg-2", "", "Untimed.", 8 * RATE, 9 * RATE, RATE)]
    srt = to_srt(caps)
    blocks = [b.splitlines() for b in srt.strip().split("\n\n")]
    assert [b[2] for b in blocks] == ["Alice: The quiet harbour woke slowly as the first",
                                      "Alice: boats went out to sea.", "Untimed."]
    # The first line starts with the take, the next where its first word does, and runs to the take's end.
    assert [b[1] for b in blocks] == ["00:00:02,000 --> 00:00:05,200", "00:00:05,200 --> 00:00:07,500",
                                      "00:00:08,000 --> 00:00:09,000"]
    vtt = to_vtt(caps)
    assert ("seg-1-1\n00:00:02.000 --> 00:00:05.200\n<v Alice>The <00:00:02.400>quiet <00:00:02.800>harbour"
            in vtt)
    assert "seg-1-2\n00:00:05.200 --> 00:00:07.500\n<v Alice>boats <00:00:05.600>went" in vtt
    assert "seg-2\n00:00:08.000 --> 00:00:09.000\nUntimed." in vtt
    chinese = tuple(Word(c, i * 0.2, i * 0.2 + 0.2) for i, c in enumerate("今天天气很好。"[:6]))
    vtt = to_vtt([Caption("z", "", "今天天气很好", 0, RATE * 2, RATE, chinese)])
    assert "今<00:00:00.200>天<00:00:00.400>天" in vtt


# ----------------------------------------------------------------------------- render

def _voiced(seconds: float, f0: float, seed: int) -> Audio:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    x = 0.2 * np.sin(2 * np.pi * f0 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t)) + 0.01 * rng.standard_normal(len(t))
    return Audio(x.astype(np.float32), RATE)


def test_render_places_takes_and_captions_at_their_exact_samples(tmp_path):
    takes = [_voiced(1.0, 150, 0), _voiced(0.7, 220, 1), _voiced(1.2, 180, 2), _voiced(0.5, 130, 3)]
    items = [RenderItem("a", "A", "one", lambda: takes[0], pause_ms=250),
             RenderItem("b", "B", "two", lambda: takes[1], pause_ms=0),         # cross-fades into c
             RenderItem("c", "A", "three", lambda: takes[2], pause_ms=100),
             RenderItem("d", "B", "four", lambda: takes[3], target_start_ms=5000)]  # an SRT cue later than the flow
    result = render(items, tmp_path / "out.wav", "wav", sample_rate=RATE, target_lufs=-23.0, crossfade_ms=20)
    starts = [c.start_sample for c in result.captions]
    fade = int(RATE * 0.02)
    assert starts[0] == 0
    assert starts[1] == len(takes[0].samples) + int(RATE * 0.25)
    assert starts[2] == starts[1] + len(takes[1].samples) - fade
    assert starts[3] == 5 * RATE
    assert result.total_samples == 5 * RATE + len(takes[3].samples)
    rendered, rate = sf.read(tmp_path / "out.wav", dtype="float32")
    assert rate == RATE and len(rendered) == result.total_samples
    gain = 10 ** (result.gain_db / 20)
    margin = fade + int(RATE * 0.005)
    for cap, take in zip(result.captions, takes):
        assert cap.end_sample - cap.start_sample == len(take.samples)
        inner = slice(margin, len(take.samples) - margin)
        assert np.max(np.abs(rendered[cap.start_sample:cap.end_sample][inner] - take.samples[inner] * gain)) < 1e-3
    # The gap before the cue is silence, and the loudness target is met.
    assert np.max(np.abs(rendered[result.captions[2].end_sample + 10:starts[3] - 10])) == 0
    assert abs(pyloudnorm.Meter(RATE).integrated_loudness(rendered) - (-23.0)) < 0.1
    assert result.loudness_lufs == pytest.approx(-23.0)


def test_a_render_never_passes_the_peak_ceiling(tmp_path):
    spike = np.zeros(RATE, np.float32)
    spike[RATE // 2] = 0.9
    quiet = Audio(_voiced(1.0, 200, 4).samples * 0.05 + spike, RATE)
    result = render([RenderItem("a", "", "x", lambda: quiet)], tmp_path / "o.wav", "wav", sample_rate=RATE,
                    target_lufs=-10.0)
    assert result.peak <= PEAK_CEILING + 1e-6 and result.loudness_lufs < -10.0


@pytest.mark.parametrize("fmt", RENDER_FORMATS)
def test_every_format_is_written_and_decodes(tmp_path, fmt):
    takes = [_voiced(0.8, 160, 5), _voiced(0.6, 200, 6)]
    items = [RenderItem(str(i), "", "t", lambda a=a: a, pause_ms=200) for i, a in enumerate(takes)]
    result = render(items, tmp_path / f"o.{fmt}", fmt, sample_rate=RATE, target_lufs=-16.0)
    samples, rate = sf.read(io.BytesIO((tmp_path / f"o.{fmt}").read_bytes()), dtype="float32")
    assert abs(len(samples) / rate - result.duration_s) < 0.08
    assert not list(tmp_path.glob("*.raw.wav")) and not list(tmp_path.glob("*.part"))


def test_render_refuses_nothing_and_unknown_formats(tmp_path):
    with pytest.raises(InputError, match="no segments"):
        render([], tmp_path / "o.wav", "wav", sample_rate=RATE, target_lufs=-16)
    with pytest.raises(InputError, match="unsupported render format"):
        render([RenderItem("a", "", "", lambda: _voiced(0.5, 100, 0))], tmp_path / "o.pcm", "pcm", sample_rate=RATE,
               target_lufs=-16)


def test_streamed_loudness_agrees_with_pyloudnorm(tmp_path):
    from productions.render import stream_loudness

    rng = np.random.default_rng(7)
    for rate, seconds in ((24000, 9.3), (44100, 2.05)):
        t = np.arange(int(seconds * rate)) / rate
        x = (0.2 * np.sin(2 * np.pi * 300 * t) * (np.sin(2 * np.pi * 0.5 * t) > 0)
             + 0.02 * rng.standard_normal(len(t))).astype(np.float32)
        sf.write(tmp_path / "x.wav", x, rate, subtype="FLOAT")
        assert stream_loudness(tmp_path / "x.wav", rate) == pytest.approx(
            pyloudnorm.Meter(rate).integrated_loudness(x), abs=1e-4)
    sf.write(tmp_path / "silence.wav", np.zeros(RATE * 2, np.float32), RATE, subtype="FLOAT")
    assert stream_loudness(tmp_path / "silence.wav", RATE) is None


def test_a_long_render_never_holds_a_copy_of_itself(tmp_path):
    import tracemalloc

    take = _voiced(3.0, 170, 8)
    items = [RenderItem(str(i), "", "t", lambda: take, pause_ms=300) for i in range(40)]   # 2 minutes
    tracemalloc.start()
    result = render(items, tmp_path / "long.flac", "flac", sample_rate=RATE, target_lufs=-16.0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    one_copy = result.total_samples * 4
    assert peak < 0.5 * one_copy, f"peak {peak / 2**20:.1f} MiB for a {one_copy / 2**20:.1f} MiB render"


# ----------------------------------------------------------------------------- any input: a clear error or a result

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_TOKENS = list("ab [S1]:：\n,.。！?->0123456789\r\t<i>{}你") + ["00:00:01,000 --> 00:00:02,000", "\n\n", "[Laughter]",
                                                                 "Alice: ", "guo4"]
_TEXTY = st.lists(st.sampled_from(_TOKENS), max_size=80).map("".join)


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(_TEXTY, st.integers(min_value=1, max_value=60))
def test_parsers_answer_any_text_with_segments_or_an_input_error(text, max_chars):
    for parse in (lambda: parse_srt(text), lambda: parse_script(text, max_chars),
                  lambda: split_segments(text, max_chars)):
        try:
            out = parse()
        except InputError:
            continue
        assert out and all(getattr(piece, "text", "").strip() for piece in out)
        if not isinstance(out[0], Cue):   # a segment never exceeds what the model takes in one go
            assert all(len(piece.text) <= max_chars for piece in out), [p.text for p in out]
