"""Audio in and out: decoding, channel mixing, resampling, encoding.

Owns: the ``Audio`` value type (mono float32 samples + rate, plus the channels as decoded), turning
whatever a user uploads into one -- within bounds read from the file's header *before* decoding, so
a small compressed upload cannot expand into gigabytes of samples -- the resampler every stage uses,
and encoding results for download or HTTP.
Does not own: model-specific preprocessing (trim, normalisation), which lives with each model.

Resampling reproduces the windowed-sinc resampler of torchaudio (``sinc_interp_hann``,
``lowpass_filter_width=6``, ``rolloff=0.99``) that the reference implementation uses, so that
tokens and prompt features match it; unlike the reference it works in both directions
(8 kHz input is upsampled). The algorithm (J. O. Smith, "Digital Audio Resampling") builds, for
each of the ``new/gcd`` output phases, a Hann-windowed sinc kernel sampled at the input grid, and
applies all phases at once as a strided 1-D convolution.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Union

import numpy as np
import soundfile as sf
import soxr
import torch

from core.errors import InputError

OUTPUT_FORMATS = ("wav", "flac", "mp3", "opus", "pcm")
_MAX_KERNEL_TAPS = 4_000_000  # standard rate pairs need < 300k (11025 -> 16000 is the largest)
# Decoding bounds, checked against the header before any sample is decoded (and again while
# reading, in case the header lies). 30 s of 192 kHz stereo is 11.5 M samples; a 46 KB FLAC of a
# minute of 96 kHz 8-channel silence would be 46 M (184 MB of float32) and is refused.
MAX_CHANNELS = 8
MAX_SAMPLE_RATE = 384_000
MAX_DECODED_SAMPLES = 2**24   # frames x channels; 16.8 M float32 values = 64 MiB
_MEDIA_TYPES = {"wav": "audio/wav", "flac": "audio/flac", "mp3": "audio/mpeg", "opus": "audio/ogg",
                "pcm": "audio/L16"}


@dataclass(frozen=True)
class Audio:
    """Mono float32 samples in [-1, 1] at ``sample_rate`` Hz.

    ``channels`` keeps the decoded ``[C, N]`` array (channels first, as the reference loads a
    file) when the source had more than one channel; the clone speaker id hashes it. It is None
    for mono sources, where ``samples`` is the decoded array itself.
    """

    samples: np.ndarray
    sample_rate: int
    channels: np.ndarray | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        samples = np.ascontiguousarray(self.samples, dtype=np.float32)
        if samples.ndim != 1:
            raise ValueError(f"Audio.samples must be 1-D (mono), got shape {samples.shape}")
        if self.sample_rate <= 0:
            raise ValueError(f"Audio.sample_rate must be positive, got {self.sample_rate}")
        samples.setflags(write=False)
        object.__setattr__(self, "samples", samples)
        if self.channels is not None:
            channels = np.ascontiguousarray(self.channels, dtype=np.float32)
            if channels.ndim != 2 or channels.shape[1] != samples.shape[0]:
                raise ValueError(f"Audio.channels must be [C, {samples.shape[0]}], got shape {channels.shape}")
            channels.setflags(write=False)
            object.__setattr__(self, "channels", channels)

    def as_loaded(self) -> np.ndarray:
        """The decoded ``[C, N]`` float32 array (``[1, N]`` for mono sources)."""
        return self.channels if self.channels is not None else self.samples[None, :]

    @property
    def duration(self) -> float:
        return len(self.samples) / self.sample_rate


AudioSource = Union[Audio, str, Path, bytes, tuple]


def load_audio(source: AudioSource, max_seconds: float | None = None, what: str = "the audio clip") -> Audio:
    """Decode ``source`` into mono float32.

    Parameters:
        source: an :class:`Audio`, a file path, the bytes of an audio file (WAV, FLAC, OGG, MP3,
            any bit depth), or a ``(sample_rate, array)`` pair as Gradio gives it (int or float
            array, ``[N]`` or ``[N, channels]``).
        max_seconds: reject longer clips (for files: from the header, before decoding).
        what: how error messages name the clip (e.g. "the prompt clip", "the audio to edit").

    Raises:
        InputError: the data is not decodable audio, is empty, holds NaN/inf, is too long, or
            exceeds :data:`MAX_CHANNELS`, :data:`MAX_SAMPLE_RATE` or :data:`MAX_DECODED_SAMPLES`.
    """
    if isinstance(source, Audio):
        audio = source
    elif isinstance(source, tuple):
        audio = _from_array(*source)
    else:
        audio = _decode_file(source, max_seconds, what)
    if len(audio.samples) == 0:
        raise InputError(f"{what} is empty (0 samples)")
    if not np.isfinite(audio.samples).all():
        raise InputError(f"{what} contains NaN or infinite samples")
    if max_seconds is not None and audio.duration > max_seconds:
        raise InputError(f"{what} is {audio.duration:.1f} s long; the limit is {max_seconds:g} s "
                         "(setting max_prompt_seconds)")
    return audio


def _decode_file(source: str | Path | bytes, max_seconds: float | None, what: str) -> Audio:
    name = "uploaded data" if isinstance(source, bytes) else Path(source).name
    handle = io.BytesIO(source) if isinstance(source, bytes) else str(source)
    if isinstance(source, (str, Path)) and not Path(source).is_file():
        raise InputError(f"audio file not found: {name}")
    try:
        with sf.SoundFile(handle) as f:
            limit = _frame_limit(f.frames, f.samplerate, f.channels, max_seconds, what)
            # Never more than the limit (+1 to notice a header that under-reports its length).
            data = f.read(frames=limit + 1, dtype="float32", always_2d=True)
            rate = f.samplerate
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        # libsndfile's own message names the Python file object; its error string alone is the reason.
        reason = getattr(exc, "error_string", None) or str(exc)
        raise InputError(f"could not decode {name} as audio ({reason.rstrip('.')}); use WAV, FLAC, OGG or MP3") from None
    if len(data) > limit:
        _frame_limit(len(data), rate, data.shape[1], max_seconds, what)  # raises with the real length
    return _from_channels(data, int(rate))


def _frame_limit(frames: int, rate: int, channels: int, max_seconds: float | None, what: str) -> int:
    """The most frames a clip with this header may decode to; InputError naming the limit when
    ``frames`` (from the header) already exceeds it."""
    if not 0 < channels <= MAX_CHANNELS:
        raise InputError(f"{what} has {channels} channels; at most {MAX_CHANNELS} are accepted")
    if not 0 < rate <= MAX_SAMPLE_RATE:
        raise InputError(f"{what} has a sample rate of {rate} Hz; at most {MAX_SAMPLE_RATE} Hz is accepted")
    if max_seconds is not None and frames / rate > max_seconds:
        raise InputError(f"{what} is {frames / rate:.1f} s long; the limit is {max_seconds:g} s "
                         "(setting max_prompt_seconds)")
    if frames * channels > MAX_DECODED_SAMPLES:
        raise InputError(f"{what} would decode to {frames * channels:,} samples ({frames:,} frames x {channels} "
                         f"channels at {rate} Hz); the limit is {MAX_DECODED_SAMPLES:,}")
    limit = MAX_DECODED_SAMPLES // channels
    if max_seconds is not None:
        limit = min(limit, math.floor(max_seconds * rate) + 1)
    return limit


def _from_channels(data: np.ndarray, rate: int) -> Audio:
    """``[N, C]`` float32 as decoded -> Audio (mono mix, and the channels when there are several)."""
    if data.shape[1] == 1:
        return Audio(data[:, 0], rate)
    return Audio(data.mean(axis=1), rate, channels=data.T)


def _from_array(sample_rate: int, array: np.ndarray) -> Audio:
    array = np.asarray(array)
    if array.size == 0:  # before mixing: the mean of no samples is NaN, which would be misreported
        raise InputError("the audio clip is empty (0 samples)")
    rate = sample_rate.item() if isinstance(sample_rate, np.generic) else sample_rate
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate < 10**7 or rate != int(rate):
        raise InputError(f"the audio sample rate must be a positive whole number of Hz, got {sample_rate!r}")
    if array.ndim == 2:
        # Gradio gives [N, channels]; accept [channels, N] too when it is clearly that.
        array = array.T if array.shape[0] < array.shape[1] and array.shape[0] <= 8 else array
        if array.shape[1] > MAX_CHANNELS:
            raise InputError(f"the audio clip has {array.shape[1]} channels; at most {MAX_CHANNELS} are accepted")
        return _from_channels(_int_to_float(array), int(rate))  # integers: scale first, then mix
    if array.ndim != 1:
        raise InputError(f"audio array must be 1-D or 2-D, got shape {array.shape}")
    return Audio(_int_to_float(array), int(rate))


def _int_to_float(array: np.ndarray) -> np.ndarray:
    if np.issubdtype(array.dtype, np.integer):
        return array.astype(np.float32) / float(np.iinfo(array.dtype).max + 1)
    return array.astype(np.float32)


def peak_limit(samples: np.ndarray, peak: float) -> np.ndarray:
    """Scale down so that max |x| <= ``peak``; never scales up."""
    norm = float(np.abs(samples).max()) if len(samples) else 0.0
    return samples / norm * peak if norm > peak else samples


# --------------------------------------------------------------------------- resampling

@lru_cache(maxsize=32)
def _sinc_kernel(orig: int, new: int, width_zeros: int = 6, rolloff: float = 0.99,
                 float32_kernel: bool = False) -> tuple[torch.Tensor, int]:
    """The ``[new, 1, taps]`` polyphase kernel for reduced rates ``orig -> new`` and its half-width."""
    base = min(orig, new) * rolloff
    width = math.ceil(width_zeros * orig / base)
    if float32_kernel:
        # torchaudio.functional.resample builds the kernel in the waveform's dtype (float32).
        idx = torch.arange(-width, width + orig, dtype=torch.float32)[None, None] / orig
        t = torch.arange(0, -new, -1, dtype=torch.float32)[:, None, None] / new + idx
    else:
        idx = torch.arange(-width, width + orig, dtype=torch.float64)[None, None] / orig
        # The phase offsets are divided in float32 and the rest is float64, as in the reference's
        # Resample transform; this keeps us within 1e-6 of its output.
        t = (torch.arange(0, -new, -1)[:, None, None] / new).to(torch.float64) + idx
    t = (t * base).clamp(-width_zeros, width_zeros)
    window = torch.cos(t * math.pi / width_zeros / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / torch.where(t == 0, torch.ones_like(t), t))
    kernel = sinc * (window * (base / orig))
    return kernel.to(torch.float32), width


def resample(samples: np.ndarray, orig_rate: int, new_rate: int, *, float32_kernel: bool = False) -> np.ndarray:
    """Band-limited resampling of a 1-D float32 signal; output length ``ceil(N * new / orig)``.

    ``float32_kernel=False`` reproduces ``torchaudio.transforms.Resample`` (the tokenizer path);
    ``True`` reproduces ``torchaudio.functional.resample`` on float32 input (the CosyVoice prompt
    frontend), whose kernel is computed in float32. They differ by ~1e-7, which matters only for
    matching the reference's log features in near-silent bins.
    """
    if orig_rate == new_rate:
        return np.asarray(samples, dtype=np.float32)
    gcd = math.gcd(int(orig_rate), int(new_rate))
    orig, new = orig_rate // gcd, new_rate // gcd
    if new * (orig + 2 * math.ceil(6 * orig / (min(orig, new) * 0.99))) > _MAX_KERNEL_TAPS:
        # An odd rate (e.g. 44101 Hz in a crafted header) would need a gigabyte-sized polyphase
        # kernel; no reference parity is at stake for such rates, so let soxr do it.
        out = soxr.resample(np.asarray(samples, dtype=np.float32), orig_rate, new_rate, quality="HQ")
        target = math.ceil(new * len(samples) / orig)
        return np.pad(out, (0, max(0, target - len(out))))[:target].astype(np.float32, copy=False)
    kernel, width = _sinc_kernel(orig, new, float32_kernel=float32_kernel)
    x = torch.from_numpy(np.require(samples, np.float32, ("C", "W")))  # Audio.samples are read-only
    length = x.shape[-1]
    padded = torch.nn.functional.pad(x[None, None], (width, width + orig))
    with torch.no_grad():
        out = torch.nn.functional.conv1d(padded, kernel, stride=orig)  # [1, new, frames]
    out = out.transpose(1, 2).reshape(-1)
    target = math.ceil(new * length / orig)
    return out[:target].numpy()


def resample_audio(audio: Audio, new_rate: int) -> Audio:
    return audio if audio.sample_rate == new_rate else Audio(resample(audio.samples, audio.sample_rate, new_rate), new_rate)


# --------------------------------------------------------------------------- encoding

def media_type(fmt: str) -> str:
    return _MEDIA_TYPES[fmt]


def encode_lossless(audio: Audio) -> bytes:
    """A 32-bit float WAV holding ``audio``'s samples exactly (not clipped): what an edit chain keeps
    as the next edit's input, so that it never re-decodes its own lossy download."""
    buffer = io.BytesIO()
    sf.write(buffer, audio.samples, audio.sample_rate, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


def encode_audio(audio: Audio, fmt: str = "wav") -> bytes:
    """Encode for download/HTTP: wav (16-bit PCM), flac, mp3, opus (Ogg) or raw 16-bit little-endian pcm.

    Raises:
        InputError: unknown format.
    """
    if fmt not in OUTPUT_FORMATS:
        raise InputError(f"unsupported audio format {fmt!r}; choose one of {', '.join(OUTPUT_FORMATS)}")
    samples = np.clip(audio.samples, -1.0, 1.0)
    if fmt == "pcm":
        return (samples * 32767.0).astype("<i2").tobytes()
    buffer = io.BytesIO()
    options = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"), "mp3": ("MP3", "MPEG_LAYER_III"),
               "opus": ("OGG", "OPUS")}[fmt]
    rate = audio.sample_rate
    if fmt == "opus" and rate not in (8000, 12000, 16000, 24000, 48000):
        samples, rate = resample(samples, rate, 48000), 48000
    sf.write(buffer, samples, rate, format=options[0], subtype=options[1])
    return buffer.getvalue()


# (container, subtype) of each file format, for writing block by block (long renders).
_FILE_FORMATS = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"), "mp3": ("MP3", "MPEG_LAYER_III"),
                 "opus": ("OGG", "OPUS")}


def open_encoder(path: str | Path, fmt: str, sample_rate: int) -> sf.SoundFile:
    """A mono file writer for ``fmt`` (wav 16-bit, flac, mp3, opus in Ogg) that takes float32 blocks in
    [-1, 1] through ``write``; close it (or use ``with``) to finish the file.

    Raises:
        InputError: unknown format, or opus at a rate Opus does not take (8/12/16/24/48 kHz).
    """
    if fmt not in _FILE_FORMATS:
        raise InputError(f"unsupported file format {fmt!r}; choose one of {', '.join(_FILE_FORMATS)}")
    if fmt == "opus" and sample_rate not in (8000, 12000, 16000, 24000, 48000):
        raise InputError(f"opus needs 8, 12, 16, 24 or 48 kHz, not {sample_rate} Hz")
    container, subtype = _FILE_FORMATS[fmt]
    return sf.SoundFile(str(path), "w", samplerate=sample_rate, channels=1, format=container, subtype=subtype)
