"""Engine-level features of the 2026-01 release: edit strength by iterations and transcription.

Covers, on both engines (the preview engine, and StepAudioEngine on tiny random-weight models in
the real folder layout): ``Engine.edit_iterations`` runs each pass on the previous pass's audio
(the input digest of pass i+1 is the digest of pass i's output), derives the seeds from the first,
reports progress across passes and refuses counts outside 1..5; ``Engine.transcribe`` runs the
tokenizer folder's Paraformer through funasr (tiny fixture: the path runs and returns text, the
same twice, leaving the caller's random state alone), and the preview engine without that folder
says it cannot transcribe.
"""

import random
import shutil

import pytest
import torch

from core.audio_io import load_audio
from core.errors import InputError, ModelError
from core.settings import FUNASR_SUBDIR, Settings
from funasr_cache.store import PromptCache, audio_digest
from testkit.paths import FIXTURES, ROOT

PROMPT_WAV = FIXTURES / "prompt_22k.wav"
PROMPT_TEXT = "The quick brown fox jumps over the lazy dog near the river bank."
TOKENIZER = FIXTURES / "tokenizer" / "Step-Audio-Tokenizer"


def _vocabulary() -> set[str]:
    import json

    return set(json.loads((TOKENIZER / FUNASR_SUBDIR / "tokens.json").read_text()))


@pytest.fixture(scope="module")
def preview(tmp_path_factory):
    from preview.engine import PreviewEngine

    root = tmp_path_factory.mktemp("preview")
    shutil.copytree(TOKENIZER, root / "models" / "Step-Audio-Tokenizer")
    settings = Settings(model_root=root / "models", cache_dir=root / "cache")
    return PreviewEngine(settings, PromptCache.from_settings(settings))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from testkit.tiny_models import build_tiny_model_root
    from tts_engine.step_audio import StepAudioEngine

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = build_tiny_model_root(tmp_path_factory.mktemp("tiny"))
    settings = Settings(model_root=root, cache_dir=root / "cache", llm_max_new_tokens=30, flow_steps=2)
    engine = StepAudioEngine(settings, PromptCache.from_settings(settings))
    yield engine
    engine.close()
    torch.set_num_threads(threads)


def _digest(audio):
    return audio_digest(audio.samples, audio.sample_rate)


def test_preview_iterations_edit_the_previous_pass(preview):
    source = load_audio(str(ROOT / "examples" / "en_low.flac"))
    reports = []
    results = preview.edit_iterations(source, "The quiet harbour.", "speed", "slower", iterations=3, seed=10,
                                      progress=lambda f, d: reports.append((f, d)))
    assert len(results) == 3 and [r.seed for r in results] == [10, 11, 12]
    assert results[0].prompt_digest == _digest(source)
    for before, after in zip(results, results[1:]):
        assert after.prompt_digest == _digest(before.audio)
        assert after.audio.duration > before.audio.duration * 1.05   # each pass slows the last one down
    fractions = [f for f, _ in reports]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert any(d.startswith("pass 3/3") for _, d in reports)


@pytest.mark.parametrize("bad", [0, 6, -1, True, 2.0, "2"])
def test_iterations_out_of_range_are_refused(preview, bad):
    with pytest.raises(InputError, match="iterations must be a whole number from 1 to 5"):
        preview.edit_iterations(str(PROMPT_WAV), PROMPT_TEXT, "vad", iterations=bad)


def test_step_audio_iterations_edit_the_previous_pass(tiny):
    results = tiny.edit_iterations(str(PROMPT_WAV), PROMPT_TEXT, "emotion", "happy", iterations=2, seed=7)
    assert [r.seed for r in results] == [7, 8]
    assert results[0].prompt_digest == _digest(load_audio(str(PROMPT_WAV)))
    assert results[1].prompt_digest == _digest(results[0].audio)
    assert all(r.tokens and r.text == PROMPT_TEXT for r in results)


def test_transcription_on_the_tiny_paraformer(preview, tiny):
    torch.manual_seed(123)
    random.seed(123)
    expected_torch, expected_py = torch.rand(3), random.random()
    torch.manual_seed(123)
    random.seed(123)
    first = preview.transcribe(str(PROMPT_WAV))
    assert torch.equal(torch.rand(3), expected_torch) and random.random() == expected_py
    # funasr's post-processing upper-cases Latin tokens; the letters are the tiny model's own.
    assert first.text and set(first.text.lower().replace(" ", "")) <= set("".join(_vocabulary()))
    assert first.model == FUNASR_SUBDIR.split("/")[-1]
    assert {"decode_audio", "asr"} <= set(first.timings.stages_ms)
    # The same model through the Step-Audio engine (and a second run) hears the same words.
    assert tiny.transcribe(str(PROMPT_WAV)).text == first.text
    assert preview.transcribe(load_audio(str(PROMPT_WAV))).text == first.text


def test_preview_without_the_asr_folder_says_it_cannot_transcribe(tmp_path):
    from preview.engine import PreviewEngine

    settings = Settings(model_root=tmp_path / "models", cache_dir=tmp_path / "cache")
    engine = PreviewEngine(settings, PromptCache.from_settings(settings))
    with pytest.raises(InputError, match="preview engine cannot transcribe") as err:
        engine.transcribe(str(PROMPT_WAV))
    assert str(settings.tokenizer_dir) in str(err.value) and "type" in str(err.value)


def test_a_broken_asr_folder_is_a_model_error(tmp_path):
    from tokenizer.asr import Transcriber

    folder = tmp_path / "asr"
    shutil.copytree(TOKENIZER / FUNASR_SUBDIR, folder)
    (folder / "am.mvn").unlink()
    with pytest.raises(ModelError, match="am.mvn"):
        Transcriber(folder).transcribe(str(PROMPT_WAV))
