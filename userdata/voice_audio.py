"""What of a voice's clip is stored: exactly what the engine consumes, in as few bytes as that allows.

Owns: :func:`pack_audio` (an ``Audio`` -> the stored bytes) and :func:`unpack_audio` (back), with
the promise that the unpacked clip gives the engine the same inputs as the original upload:

* the mono samples at the upload's rate, bit-exact (the prompt cache digest,
  ``funasr_cache.audio_digest``, hashes them): FLAC when every sample is a 16-bit value (a 16-bit
  mono upload), else 32-bit float WAV (what a mono mix of several channels needs);
* for a multi-channel upload, only what the clone speaker id (``llm.prompts.clone_speaker_id``)
  hashes of the channels -- the first and the last 1000 values of the channel-major ``[C, N]`` array
  (all of it when it is small) -- as a small ``.npy``. Unpacking rebuilds a ``[2, N]`` channel array
  whose flattened ends are those values, so the speaker id is unchanged while the other channels'
  bytes are not kept (an 8-channel upload stores an eighth of what its channels held).

A pack is checked by unpacking it before it is returned, so a packing that would change the engine's
input is never stored.
Does not own: decoding uploads (``core.audio_io``), the speaker id itself (``llm.prompts``), where
the bytes are kept (``userdata.voices``).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import soundfile as sf

from core.audio_io import Audio, load_audio
from core.errors import InputError

SPEAKER_EDGE = 1000          # values at each end of the flattened channels that the speaker id hashes
_PCM16_SCALE = 32768.0       # libsndfile reads 16-bit PCM as int / 32768


@dataclass(frozen=True)
class PackedAudio:
    """A clip as stored: ``data`` (FLAC or float WAV, mono) and ``speaker`` (.npy or None)."""

    data: bytes
    speaker: bytes | None
    channels: int             # of the original upload

    @property
    def nbytes(self) -> int:
        return len(self.data) + len(self.speaker or b"")


def speaker_view(channels: np.ndarray) -> np.ndarray:
    """The part of a ``[C, N]`` array the clone speaker id hashes: all of it when it has at most
    2 x SPEAKER_EDGE values or N < SPEAKER_EDGE, else ``[2, SPEAKER_EDGE]`` (head, tail)."""
    count, frames = channels.shape
    if count * frames <= 2 * SPEAKER_EDGE or frames < SPEAKER_EDGE:
        return np.ascontiguousarray(channels, dtype=np.float32)
    flat = channels.reshape(-1)
    return np.stack([flat[:SPEAKER_EDGE], flat[-SPEAKER_EDGE:]]).astype(np.float32)


def _expand(view: np.ndarray, frames: int) -> np.ndarray:
    """A ``[C', frames]`` array whose channel-major flattening starts and ends like the original's."""
    if view.shape[1] == frames:
        return view
    rebuilt = np.zeros((2, frames), dtype=np.float32)
    rebuilt[0, :SPEAKER_EDGE] = view[0]
    rebuilt[1, -SPEAKER_EDGE:] = view[1]
    return rebuilt


def pack_audio(audio: Audio) -> PackedAudio:
    """The stored form of ``audio`` (see the module docstring)."""
    samples = audio.samples
    scaled = samples.astype(np.float64) * _PCM16_SCALE
    pcm16 = bool(np.all(scaled == np.round(scaled)) and scaled.min(initial=0) >= -32768 and scaled.max(initial=0) <= 32767)
    buffer = io.BytesIO()
    if pcm16:
        try:
            sf.write(buffer, samples, audio.sample_rate, format="FLAC", subtype="PCM_16")
        except (sf.LibsndfileError, RuntimeError, ValueError):   # a rate FLAC cannot carry
            buffer, pcm16 = io.BytesIO(), False
    if not pcm16:
        sf.write(buffer, samples, audio.sample_rate, format="WAV", subtype="FLOAT")
    speaker = None
    if audio.channels is not None:
        npy = io.BytesIO()
        np.save(npy, speaker_view(audio.channels), allow_pickle=False)
        speaker = npy.getvalue()
    packed = PackedAudio(buffer.getvalue(), speaker, 1 if audio.channels is None else audio.channels.shape[0])
    back = unpack_audio(packed.data, packed.speaker)
    if not np.array_equal(back.samples, samples) or back.sample_rate != audio.sample_rate:
        raise AssertionError("packing a voice's audio changed its samples")   # an internal invariant
    return packed


def unpack_audio(data: bytes, speaker: bytes | None, max_seconds: float | None = None,
                 what: str = "the voice's audio") -> Audio:
    """The clip the engine gets for a stored voice.

    Raises:
        InputError: the bytes are not audio, or ``speaker`` is not a float32 array that fits it.
    """
    audio = load_audio(data, max_seconds=max_seconds, what=what)
    if audio.channels is not None:
        raise InputError(f"{what} has {audio.channels.shape[0]} channels; a stored voice's audio is mono")
    if speaker is None:
        return audio
    view = read_speaker(speaker, len(audio.samples), what)
    return Audio(audio.samples, audio.sample_rate, channels=_expand(view, len(audio.samples)))


def read_speaker(speaker: bytes, frames: int, what: str) -> np.ndarray:
    """Parse and check a speaker ``.npy`` for a clip of ``frames`` frames (no pickles, bounded size)."""
    try:
        view = np.load(io.BytesIO(speaker), allow_pickle=False)
    except (ValueError, EOFError, OSError) as exc:
        raise InputError(f"{what}: its speaker data is not a readable array ({exc})") from None
    small = view.ndim == 2 and view.shape[1] == frames and 1 <= view.shape[0] <= 64
    edges = view.ndim == 2 and view.shape == (2, SPEAKER_EDGE) and frames >= SPEAKER_EDGE
    if view.dtype != np.float32 or not (small or edges) or not np.isfinite(view).all():
        raise InputError(f"{what}: its speaker data has shape {view.shape} ({view.dtype}), which does not fit "
                         f"a clip of {frames} frames")
    return view
