"""The quality scorers (quality/) are right, on real speech models and real eSpeak NG clips.

Covers: content error arithmetic (normalisation, WER, Chinese CER, tags) and, through a real
recogniser (PocketSphinx, testkit.quality_models) on eSpeak clips, that the right text scores low and a
wrong text high; speaker similarity by a real speaker model (Resemblyzer): same voice above a different
voice; signal checks (clipping, silences, loudness of a known tone, duration flags); word timestamps
inside the words' audible spans; caption lines; "unavailable" without models; gates (best-of-N started
together, retries, the ranking rule, bad values) with the real preview engine making the takes.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from core.audio_io import Audio
from core.errors import InputError
from preview.espeak import speak
from quality.content import content_error, is_chinese, normalise, score_content
from core.transcript import Word
from quality.contract import Recognition
from quality.gates import Gates, best_take, generate_gated
from quality.report import QualityReport, QualityScorer
from quality.signal_checks import SignalScore, expected_seconds, score_signal
from quality.speaker import cosine, score_speaker
from quality.timestamps import caption_lines, script_words, word_timestamps

SENTENCES = ("hello world this is a test", "please call me tomorrow morning", "open the door and turn on the light",
             "the weather is nice today", "we will look at the studio", "thank you for calling")
VOCABULARY = tuple(sorted({w for s in SENTENCES for w in s.split()}))


def espeak(text: str, voice: str = "en-us", rate: int = 150, pitch: int = 50) -> Audio:
    speech = speak(text, voice=voice, rate_wpm=rate, pitch=pitch)
    return Audio(speech.samples * 0.5, speech.sample_rate)


@pytest.fixture(scope="module")
def recognizer():
    from testkit.quality_models import PocketSphinxRecognizer

    return PocketSphinxRecognizer(VOCABULARY)


@pytest.fixture(scope="module")
def embedder():
    from testkit.quality_models import ResemblyzerEmbedder

    return ResemblyzerEmbedder()


# ----------------------------------------------------------------------------- content

def test_content_error_arithmetic():
    assert content_error("Hello, world! This is a test.", "hello world this is a test") == ("wer", 0.0)
    assert content_error("hello world is a test", "hello world this is a test") == ("wer", pytest.approx(1 / 6))
    assert content_error("", "hello world") == ("wer", 1.0)
    # Tags are markup, not words; case and punctuation never count.
    assert content_error("ha ha that is funny", "[Laughter] Ha-ha, that is FUNNY!")[1] == 0.0
    # Chinese: characters are the units, spaces and punctuation ignored.
    assert is_chinese("今天天气很好。") and not is_chinese("hello 你")
    assert content_error("今天 天气 好", "今天天气很好。") == ("cer", pytest.approx(1 / 6))
    assert normalise("今天，天气 很好") == "今天天气很好"
    with pytest.raises(InputError, match="no words"):
        content_error("anything", "[Laughter] !!!")


def test_right_text_scores_low_and_wrong_text_high(recognizer):
    right, wrong = [], []
    for i, sentence in enumerate(SENTENCES):
        good = score_content(espeak(sentence), sentence, recognizer)
        assert good.available and good.measure == "wer" and good.recognition.timed
        # The same transcript against another sentence (one recognition per clip: it is the slow part).
        _, bad = content_error(good.transcript, SENTENCES[(i + 1) % len(SENTENCES)])
        assert good.error < bad, (sentence, good.transcript)
        right.append(good.error)
        wrong.append(bad)
    print(f"pocketsphinx on eSpeak: right text WER {np.mean(right):.2f}, wrong text WER {np.mean(wrong):.2f}")
    assert np.mean(right) < 0.7 and np.mean(wrong) > 0.95


def test_a_dropped_half_scores_worse_than_the_whole(recognizer):
    text = "open the door and turn on the light"
    whole = score_content(espeak(text), text, recognizer)
    half = score_content(espeak("open the door"), text, recognizer)
    assert half.error >= whole.error + 0.3


def test_unavailable_without_a_recogniser():
    score = score_content(espeak("hello"), "hello", None)
    assert not score.available and score.error is None and "recogniser" in score.reason
    assert score.as_dict() == {"available": False, "reason": score.reason}


# ----------------------------------------------------------------------------- speaker

def test_same_voice_scores_higher_than_a_different_voice(embedder):
    scorer = QualityScorer(embedder=embedder)
    prompt = espeak("the quiet harbour woke slowly as the first boats went out", "en-us", 160, 35)
    reference = scorer.reference(prompt)
    same = score_speaker(espeak("thank you for calling, your order will arrive on thursday", "en-us", 160, 35), reference)
    other = score_speaker(espeak("thank you for calling, your order will arrive on thursday", "en-us+f3", 175, 75),
                          reference)
    assert same.available and other.available
    print(f"resemblyzer: same voice {same.similarity:.3f}, different voice {other.similarity:.3f}")
    assert same.similarity > other.similarity + 0.05
    assert -1.0 <= other.similarity <= same.similarity <= 1.0


def test_speaker_unavailable_without_a_model_or_a_prompt(embedder):
    clip = espeak("hello world")
    assert not score_speaker(clip, QualityScorer().reference(clip)).available
    missing = score_speaker(clip, QualityScorer(embedder=embedder).reference(None))
    assert not missing.available and "prompt" in missing.reason
    assert cosine(np.zeros(3), np.ones(3)) == 0.0
    assert cosine(np.array([1.0, 0.0]), np.array([2.0, 0.0])) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- signal

def test_signal_checks_measure_a_known_tone():
    rate = 24000
    t = np.arange(int(2.0 * rate)) / rate
    tone = (0.1 * np.sin(2 * np.pi * 997 * t)).astype(np.float32)
    padded = np.concatenate([np.zeros(int(0.5 * rate), np.float32), tone, np.zeros(int(1.8 * rate), np.float32)])
    score = score_signal(Audio(padded, rate), "one two three four five")   # 2 s expected
    assert score.lufs == pytest.approx(-23.0, abs=0.5) or score.lufs < -23.0   # silence gates lower it a little
    assert score.leading_silence_s == pytest.approx(0.5, abs=0.02)
    assert score.trailing_silence_s == pytest.approx(1.8, abs=0.02)
    assert score.duration_ratio == pytest.approx(1.0, abs=0.02)
    assert score.flags == ("trailing_silence",)
    assert score_signal(Audio(tone, rate)).lufs == pytest.approx(-23.0, abs=0.1)


def test_signal_flags_clipping_silence_and_duration():
    rate = 24000
    loud = np.clip(np.sin(2 * np.pi * 200 * np.arange(rate) / rate) * 3.0, -1.0, 1.0).astype(np.float32)
    assert "clipping" in score_signal(Audio(loud, rate)).flags
    silent = score_signal(Audio(np.zeros(rate, np.float32), rate), "hello there")
    assert silent.flags == ("silent",) and silent.lufs is None
    speech = espeak("hello")
    assert "too_short" in score_signal(speech, " ".join(["word"] * 20)).flags
    assert "too_long" in score_signal(espeak(" ".join(SENTENCES)), "hello").flags
    assert score_signal(espeak(SENTENCES[2]), SENTENCES[2]).flags == ()
    assert expected_seconds("今天天气很好") == pytest.approx(6 / 4.5)
    assert score_signal(Audio(np.zeros(100, np.float32), rate)).lufs is None   # too short for BS.1770


# ----------------------------------------------------------------------------- timestamps

def test_timestamps_fall_inside_the_words_audible_spans(recognizer):
    words = ("open", "door", "light", "morning")
    rate = 22050
    pieces, spans, at = [], [], 0.3
    pieces.append(np.zeros(int(at * rate), np.float32))
    for word in words:
        clip = espeak(word).samples
        lead, trail = _audible(clip, rate)
        spans.append((at + lead, at + trail))
        pieces += [clip, np.zeros(int(0.5 * rate), np.float32)]
        at += len(clip) / rate + 0.5
    audio = Audio(np.concatenate(pieces), rate)
    timed = word_timestamps(audio, recognizer)
    heard = [w for w in timed if w.text in words]
    assert len(heard) >= 3 and [w.text for w in heard] == [w for w in words if w in {h.text for h in heard}]
    for word in heard:
        start, end = spans[words.index(word.text)]
        middle = (word.start_s + word.end_s) / 2
        assert start - 0.05 <= middle <= end + 0.05, (word, start, end)
        assert word.start_s < end and word.end_s > start          # overlaps the audible span
        assert 0.0 <= word.start_s <= word.end_s <= audio.duration


def _audible(samples: np.ndarray, rate: int) -> tuple[float, float]:
    """First and last sample above -40 dB of the peak, in seconds."""
    loud = np.flatnonzero(np.abs(samples) > np.abs(samples).max() * 0.01)
    return loud[0] / rate, loud[-1] / rate


def test_timestamps_need_a_timed_recogniser():
    class Untimed:
        name = "untimed"

        def recognize(self, audio):
            return Recognition("hello", (), False, self.name)

    with pytest.raises(InputError, match="no word timings"):
        word_timestamps(espeak("hello"), Untimed())
    with pytest.raises(InputError, match="recogniser"):
        word_timestamps(espeak("hello"), None)


def test_script_words_keep_the_text_as_written_at_the_heard_times():
    heard = (Word("hello", 0.1, 0.5), Word("word", 0.6, 0.9), Word("how", 1.0, 1.2), Word("you", 1.5, 1.8))
    words = script_words("Hello, world! [Laughter] How are you?", heard)
    assert [w.text for w in words] == ["Hello,", "world!", "How", "are", "you?"]   # tags dropped, punctuation kept
    assert [(w.start_s, w.end_s) for w in words] == [(0.1, 0.5), (0.6, 0.9), (1.0, 1.2), (1.2, 1.5), (1.5, 1.8)]
    # "world" was misheard as "word": a substitution keeps its time; "are" was missed: it fills the gap.
    two = script_words("One two three four five.", (Word("one", 0.0, 0.2), Word("five", 2.0, 2.2)))
    assert [round(w.start_s, 3) for w in two] == [0.0, 0.2, 0.8, 1.4, 2.0]
    chinese = script_words("你好，世界。", (Word("你", 0.0, 0.2), Word("好", 0.2, 0.4), Word("世界", 0.5, 0.9)))
    assert [(w.text, w.start_s, w.end_s) for w in chinese] == [("你", 0.0, 0.2), ("好，", 0.2, 0.4),
                                                                ("世", 0.5, 0.7), ("界。", 0.7, 0.9)]
    assert script_words("Hello.", ()) == () and script_words("[Laughter]", heard) == ()
    # Apostrophes and abbreviations stay one unit on both sides; a lone leading dash goes with the first word.
    odd = script_words("— Don't stop, e.g. now.", (Word("don't", 0.0, 0.3), Word("stop", 0.3, 0.6),
                                                   Word("eg", 0.6, 0.9), Word("now", 1.0, 1.2)))
    assert [(w.text, w.start_s) for w in odd] == [("— Don't", 0.0), ("stop,", 0.3), ("e.g.", 0.6), ("now.", 1.0)]
    # English inside Chinese: a Latin word is one unit, heard as one word, not letter by letter.
    mixed = script_words("我们用 GPU 训练。", (Word("我", 0.0, 0.2), Word("们", 0.2, 0.4), Word("用", 0.4, 0.6),
                                             Word("gpu", 0.6, 1.0), Word("训", 1.0, 1.2), Word("练", 1.2, 1.4)))
    assert [(w.text, w.start_s, w.end_s) for w in mixed][3:] == [("GPU", 0.6, 1.0), ("训", 1.0, 1.2), ("练。", 1.2, 1.4)]


def test_caption_lines_group_words():
    words = tuple(Word(w, i * 0.5, i * 0.5 + 0.4) for i, w in enumerate("one two three four five six".split()))
    lines = caption_lines(words, max_chars=14, offset_s=10.0)
    assert [c.text for c in lines] == ["one two three", "four five six"]
    assert lines[0].start_s == pytest.approx(10.0) and lines[1].end_s == pytest.approx(12.9)
    paused = words[:2] + (Word("later", 5.0, 5.4),)
    assert [c.text for c in caption_lines(paused)] == ["one two", "later"]
    chinese = tuple(Word(c, i * 0.2, i * 0.2 + 0.2) for i, c in enumerate("今天天气"))
    assert caption_lines(chinese)[0].text == "今天天气"


# ----------------------------------------------------------------------------- gates

def _report(seed, *, error=None, similarity=None, flags=(), failed=()):
    from quality.content import ContentScore
    from quality.speaker import SpeakerScore

    content = ContentScore(True, error, "wer") if error is not None else None
    speaker = SpeakerScore(True, similarity) if similarity is not None else None
    signal = SignalScore(1.0, 0.5, 0.0, 0.0, 0.0, -20.0, 1.0, 1.0, tuple(flags))
    return QualityReport(signal, content, speaker, tuple(failed), seed=seed)


def test_best_take_rule():
    assert best_take([_report(0, error=0.3), _report(1, error=0.1), _report(2, error=0.1)]) == 1
    assert best_take([_report(0, error=0.0, failed=("x",)), _report(1, error=0.5)]) == 1   # passing first
    assert best_take([_report(0, error=0.1, similarity=0.5), _report(1, error=0.1, similarity=0.7)]) == 1
    assert best_take([_report(0, flags=("trailing_silence",)), _report(1)]) == 1
    assert best_take([_report(0), _report(1, error=0.9)]) == 1      # unmeasured ranks below measured
    assert best_take([_report(0), _report(1)]) == 0                 # equals: the earlier seed
    with pytest.raises(ValueError):
        best_take([])


@pytest.mark.parametrize("kwargs, match", [
    (dict(candidates=0), "candidates"), (dict(candidates=9), "candidates"), (dict(retries=4), "retries"),
    (dict(max_error=1.5), "max_error"), (dict(min_similarity=float("nan")), "min_similarity"),
    (dict(checks=frozenset({"loudness"})), "unknown quality check"), (dict(candidates=True), "candidates")])
def test_gates_refuse_bad_values(kwargs, match):
    with pytest.raises(InputError, match=match):
        Gates(**kwargs)


def test_thresholds_turn_their_checks_on():
    gates = Gates(max_error=0.2, min_similarity=0.5)
    assert gates.checks == {"signal", "content", "speaker"}
    with pytest.raises(InputError, match="recogniser"):
        QualityScorer().check_available(gates.checks)


@pytest.fixture(scope="module")
def preview(tmp_path_factory):
    from core.settings import Settings
    from funasr_cache.store import PromptCache
    from preview.engine import PreviewEngine

    settings = Settings(cache_dir=tmp_path_factory.mktemp("cache"))
    engine = PreviewEngine(settings, PromptCache.from_settings(settings))
    yield engine
    engine.close()


def test_candidates_run_together_and_the_best_is_returned(preview, embedder):
    prompt = espeak("the quiet harbour woke slowly as the first boats went out", "en-us", 160, 35)
    text = "thank you for calling"
    running, most, lock = [0], [0], threading.Lock()

    def take(seed):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            return preview.clone(prompt, "the quiet harbour woke slowly", text, seed=seed)
        finally:
            with lock:
                running[0] -= 1

    scorer = QualityScorer(embedder=embedder)
    gated = generate_gated(take, lambda r: r.audio, text, Gates(candidates=3, min_similarity=-1.0), scorer,
                           scorer.reference(prompt), seed=40)
    assert [r.seed for r in gated.reports] == [40, 41, 42] and gated.rounds == 1
    assert most[0] == 3                      # all three were in flight at once
    assert gated.take.seed == gated.report.seed
    assert gated.report.similarity == max(r.similarity for r in gated.reports)
    header = gated.header()
    assert header.isascii() and '"takes":3' in header and '"passed":true' in header


def test_retries_stop_at_k_and_return_the_best_seen(preview, embedder):
    prompt = espeak("the quiet harbour woke slowly", "en-us", 160, 35)
    calls = []

    def take(seed):
        calls.append(seed)
        return preview.clone(prompt, "the quiet harbour woke slowly", "hello there", seed=seed)

    scorer = QualityScorer(embedder=embedder)
    gated = generate_gated(take, lambda r: r.audio, "hello there", Gates(candidates=2, retries=1, min_similarity=0.9999),
                           scorer, scorer.reference(prompt), seed=7)
    assert sorted(calls) == [7, 8, 9, 10] and gated.rounds == 2
    assert not gated.report.passed and "similarity" in gated.report.failed[0]
    assert gated.report.similarity == max(r.similarity for r in gated.reports)
    # A reachable threshold stops after the first round.
    calls.clear()
    passed = generate_gated(take, lambda r: r.audio, "hello there", Gates(candidates=2, retries=2), scorer, seed=7)
    assert passed.rounds == 1 and len(calls) == 2 and passed.report.passed


def test_a_failing_take_fails_the_request(preview):
    def take(seed):
        if seed == 2:
            raise InputError("injected")
        return preview.clone(espeak("hello world"), "hello world", "hi", seed=seed)

    with pytest.raises(InputError, match="injected"):
        generate_gated(take, lambda r: r.audio, "hi", Gates(candidates=3), QualityScorer(), seed=1)
