"""audio_io: decoding uploads of every common shape, the reference-exact resampler, encoding."""

import io

import numpy as np
import pytest
import soundfile as sf

from core.audio_io import OUTPUT_FORMATS, Audio, encode_audio, load_audio, peak_limit, resample
from core.errors import InputError


def _tone(rate: int, seconds: float = 0.5, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_resampler_reproduces_reference_golden_exactly_within_tolerance(tokenizer_golden):
    golden = tokenizer_golden
    out = resample(golden["wav_in"][0], 22050, 16000)
    assert out.shape == golden["wav16k_resampled"][0].shape
    np.testing.assert_allclose(out, golden["wav16k_resampled"][0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("orig,new", [(8000, 16000), (48000, 16000), (22050, 24000), (16000, 24000)])
def test_resampler_keeps_a_tone_in_both_directions(orig, new):
    out = resample(_tone(orig), orig, new)
    assert len(out) == int(np.ceil(len(_tone(orig)) * new / orig))
    spectrum = np.abs(np.fft.rfft(out * np.hanning(len(out))))
    peak_hz = np.argmax(spectrum) * new / len(out)
    assert abs(peak_hz - 440.0) < 5.0
    # amplitude preserved away from the edges
    mid = out[len(out) // 4: -len(out) // 4]
    assert 0.45 < np.abs(mid).max() < 0.55


def test_same_samples_from_wav_and_flac_decode_identically(tmp_path):
    # Integer samples: libsndfile quantises float input differently for WAV and FLAC.
    x = (_tone(16000) * 32767).astype(np.int16)
    sf.write(tmp_path / "a.wav", x, 16000, subtype="PCM_16")
    sf.write(tmp_path / "b.flac", x, 16000, subtype="PCM_16")
    a, b = load_audio(tmp_path / "a.wav"), load_audio((tmp_path / "b.flac").read_bytes())
    assert a.sample_rate == b.sample_rate == 16000
    np.testing.assert_array_equal(a.samples, b.samples)


def test_stereo_24bit_48k_is_mixed_to_mono(tmp_path):
    left, right = _tone(48000), np.zeros(24000, np.float32)
    sf.write(tmp_path / "s.wav", np.stack([left, right], 1), 48000, subtype="PCM_24")
    audio = load_audio(tmp_path / "s.wav")
    assert audio.sample_rate == 48000 and audio.samples.ndim == 1
    np.testing.assert_allclose(audio.samples, left / 2, atol=1e-6)


def test_gradio_int16_tuple_is_scaled_to_float():
    pcm = (np.array([0, 16384, -32768, 32767], np.int16))
    audio = load_audio((8000, pcm))
    np.testing.assert_allclose(audio.samples, [0, 0.5, -1.0, 32767 / 32768])


@pytest.mark.parametrize("source,message", [
    ((16000, np.zeros((0, 2), np.int16)), "empty"),
    ((0, np.zeros(100, np.float32)), "sample rate"),
])
def test_bad_gradio_tuples_give_specific_errors(source, message):
    with pytest.raises(InputError, match=message):
        load_audio(source)


_ODD_RATE_SCRIPT = """
import resource, sys
import numpy as np
resource.setrlimit(resource.RLIMIT_AS, (3 * 1024**3, 3 * 1024**3))
from core.audio_io import resample
t = np.arange(44101 // 2) / 44101
out = resample((0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 44101, 16000)
peak = np.argmax(np.abs(np.fft.rfft(out * np.hanning(len(out))))) * 16000 / len(out)
print(len(out), out.dtype, round(float(peak)))
"""


def test_an_odd_sample_rate_resamples_in_bounded_memory():
    # 44101 Hz has no common factor with 16 kHz: the polyphase kernel would need several GB.
    import subprocess
    import sys
    from pathlib import Path
    done = subprocess.run([sys.executable, "-c", _ODD_RATE_SCRIPT], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr[-500:]
    length, dtype, peak = done.stdout.split()
    assert int(length) == -(-22050 * 16000 // 44101) and dtype == "float32" and abs(int(peak) - 440) < 5


@pytest.mark.parametrize("payload,message", [
    (b"this is not audio at all", "could not decode"),
    (b"", "could not decode"),
])
def test_bad_uploads_give_specific_errors(payload, message):
    with pytest.raises(InputError, match=message) as caught:
        load_audio(payload)
    assert "BytesIO" not in str(caught.value) and "0x" not in str(caught.value)


def test_empty_nan_and_overlong_clips_are_rejected(tmp_path):
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    with pytest.raises(InputError, match="empty"):
        load_audio(tmp_path / "empty.wav")
    with pytest.raises(InputError, match="NaN"):
        load_audio(Audio(np.array([0.0, np.nan], np.float32), 16000))
    with pytest.raises(InputError, match="limit is 0.25 s"):
        load_audio(Audio(_tone(16000), 16000), max_seconds=0.25)
    with pytest.raises(InputError, match="not found"):
        load_audio(tmp_path / "missing.wav")


def test_peak_limit_only_scales_down():
    x = np.array([0.1, -0.9], np.float32)
    np.testing.assert_allclose(peak_limit(x, 0.6), [0.1 / 0.9 * 0.6, -0.6], rtol=1e-6)
    np.testing.assert_array_equal(peak_limit(x, 0.95), x)


@pytest.mark.parametrize("fmt", OUTPUT_FORMATS)
def test_every_output_format_round_trips(fmt):
    audio = Audio(_tone(24000, 1.0), 24000)
    data = encode_audio(audio, fmt)
    if fmt == "pcm":
        decoded = np.frombuffer(data, "<i2").astype(np.float32) / 32767
        rate = 24000
    else:
        decoded, rate = sf.read(io.BytesIO(data), dtype="float32")
    assert rate in (24000, 48000)
    assert abs(len(decoded) / rate - 1.0) < 0.1
    assert 0.3 < np.abs(decoded).max() < 0.6


def test_unknown_output_format_is_an_input_error():
    with pytest.raises(InputError, match="unsupported audio format"):
        encode_audio(Audio(_tone(24000), 24000), "aiff")


# --------------------------------------------------------------------------- decompression bombs

def _encoded(frames: int, channels: int, rate: int, fmt: str = "FLAC", subtype: str = "PCM_16") -> bytes:
    buffer = io.BytesIO()
    with sf.SoundFile(buffer, "w", rate, channels, format=fmt, subtype=subtype) as f:
        block = np.zeros((min(frames, 65536), channels), np.float32)
        for start in range(0, frames, len(block)):
            f.write(block[: frames - start])
    return buffer.getvalue()


@pytest.fixture
def no_decoding(monkeypatch):
    """Fault injection: decoding samples fails loudly, so a refusal must come from the header."""
    def refuse(*args, **kwargs):
        raise AssertionError("samples were decoded")

    monkeypatch.setattr(sf.SoundFile, "read", refuse)


def test_a_flac_bomb_is_refused_from_its_header(no_decoding):
    # One minute of 96 kHz 8-channel silence: a few dozen KB that would decode to 184 MB of float32.
    bomb = _encoded(60 * 96000, 8, 96000)
    assert len(bomb) < 200_000
    with pytest.raises(InputError, match=r"60.0 s long; the limit is 30 s"):
        load_audio(bomb, max_seconds=30)
    with pytest.raises(InputError, match=r"would decode to 46,080,000 samples .* the limit is 16,777,216"):
        load_audio(bomb)  # no duration limit: the decoded-size limit still holds


@pytest.mark.parametrize("channels, rate, match", [(9, 16000, "9 channels; at most 8"),
                                                   (1, 400000, "400000 Hz; at most 384000 Hz")])
def test_odd_channel_counts_and_rates_are_refused_before_decoding(no_decoding, channels, rate, match):
    with pytest.raises(InputError, match=match):
        load_audio(_encoded(1000, channels, rate, "WAV", "PCM_16"), what="the prompt clip")


def test_a_stereo_clip_keeps_its_channels_and_the_clone_speaker_id_hashes_them():
    import hashlib

    from llm.prompts import clone_speaker_id

    rng = np.random.default_rng(3)
    left, right = (0.3 * rng.standard_normal(3000)).astype(np.float32), (0.1 * rng.standard_normal(3000)).astype(np.float32)
    buffer = io.BytesIO()
    sf.write(buffer, np.stack([left, right], axis=1), 16000, format="WAV", subtype="FLOAT")
    audio = load_audio(buffer.getvalue())
    assert np.array_equal(audio.as_loaded(), np.stack([left, right]))
    np.testing.assert_array_equal(audio.samples, (np.stack([left, right], axis=1)).mean(axis=1))
    # The reference's rule over the raw [C, N] array, flattened channel by channel (golden prompts.json).
    flat = np.concatenate([left, right])
    expected = hashlib.sha256("hello".encode() + flat[:1000].tobytes() + flat[-1000:].tobytes()).hexdigest()[:16]
    assert clone_speaker_id("hello", audio.as_loaded()) == "clone_" + expected
    assert clone_speaker_id("hello", audio.samples) != "clone_" + expected  # the mono mix is not it
    # A mono clip is its own [1, N] array.
    mono = load_audio((16000, left))
    assert mono.channels is None and np.array_equal(mono.as_loaded(), left[None])
