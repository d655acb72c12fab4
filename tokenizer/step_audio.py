"""Step-Audio's dual-codebook audio tokenizer: a prompt clip in, vq02 + vq06 codes out. Pure.

Owns: the tokenizer's preprocessing (16 kHz, peak 0.999, silence trim with the reference's
margins), vq02 (streaming Paraformer encoder -> nearest k-means centroid), vq06 (128-bin
whisper-style log-mel -> S3 ONNX tokenizer, 30 s chunks), the frozen ``Tokens`` result, and
loading the ``Step-Audio-Tokenizer`` folder. Does not own: decoding uploads (``core.audio_io``),
caching tokens (``tts_engine.prompt_bundle`` does that, cache-first), the token layout (interleave,
ids, ``<audio_N>`` strings: ``core.audio_tokens``), the Paraformer streaming loop
(``tokenizer.paraformer_stream``), prompt templates.

Shape legend:
    N   samples at 16 kHz
    T   LFR frames (vq02, 16.67 Hz) or mel frames (100 Hz) as stated
    D   Paraformer encoder size (512 real), K k-means centroids (1024 real)

Rates (pipeline.md §1.4): vq02 0..1023 at 16.67 Hz, vq06 0..4095 at 25 Hz; how they interleave
into 120 ms groups and LLM ids is ``core.audio_tokens``.

The upstream ``tts.py`` limits the clip to peak 0.6 before tokenizing; :meth:`tokenize` does not,
because the energy normalisation rescales to 0.999 anyway and the trim threshold is relative to the
clip's maximum (both scale-invariant; only float rounding differs). The golden ``wav_in`` is the
limited clip and reproduces exactly either way.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import librosa
import numpy as np
import torch

from core import audio_tokens
from core.audio_io import Audio, resample
from core.audio_tokens import VQ02_CODES, VQ06_CODES
from core.errors import InputError, ModelError
from core.onnx_session import OnnxOptions, create_session
from core.settings import FUNASR_SUBDIR
from core.timings import Timer
from tokenizer.paraformer_stream import ParaformerStream

log = logging.getLogger(__name__)

PREPROCESS_VERSION = 1            # bump when preprocessing or token layout changes: cached tokens then miss
SAMPLE_RATE = 16000
PEAK = 0.999                      # energy_norm target
NORM_FLOOR = 0.01                 # energy_norm never scales by more than PEAK / 0.01
SILENCE_PEAK = 1.0 / 32768        # below one 16-bit step the clip is digital silence
TRIM_TOP_DB, TRIM_FRAME, TRIM_HOP = 20, 512, 128
KEEP_LEFT = 800                   # 0.05 s of context kept before the first non-silent sample
KEEP_RIGHT = 3520                 # 0.22 s after the last one
TRIM_HOP_SIZE = 240               # output length is a multiple of 240 samples + KEEP_LEFT + KEEP_RIGHT
MIN_SPEECH_SAMPLES = 1920         # 120 ms = one LLM token group; shorter sound cannot carry a voice
VQ06_CHUNK = 30 * SAMPLE_RATE     # 480 000 samples per S3 tokenizer call
VQ06_MIN_CHUNK = 480              # chunks under 30 ms are dropped, as the reference does
N_FFT, MEL_HOP, N_MELS = 400, 160, 128
VQ06_TOLERANCE = 2                # codes a chunk may differ from 25 per second
CODEBOOK_FILE, ONNX_FILE = "linguistic_tokenizer.npy", "speech_tokenizer_v1.onnx"


@dataclass(frozen=True)
class Tokens:
    """The two code streams of one clip (after trimming)."""

    vq02: tuple[int, ...]   # 0..1023, 16.67 Hz
    vq06: tuple[int, ...]   # 0..4095, 25 Hz

    def __post_init__(self) -> None:
        for name, codes, size in (("vq02", self.vq02, VQ02_CODES), ("vq06", self.vq06, VQ06_CODES)):
            codes = tuple(int(c) for c in codes)
            if any(not 0 <= c < size for c in codes):
                raise ValueError(f"Tokens.{name} holds a code outside 0..{size - 1}")
            object.__setattr__(self, name, codes)

    @property
    def n_groups(self) -> int:
        """Whole 120 ms groups; codes beyond them are dropped from ids and string."""
        return audio_tokens.n_groups(self.vq02, self.vq06)

    @property
    def mixed(self) -> tuple[int, ...]:
        """Interleaved codes N in 0..5119 (vq02, or 1024 + vq06): what the decoder takes."""
        return audio_tokens.interleave(self.vq02, self.vq06)

    @property
    def llm_ids(self) -> tuple[int, ...]:
        """LLM token ids, 65536 + :attr:`mixed`."""
        return audio_tokens.to_llm_ids(self.mixed)

    @property
    def audio_string(self) -> str:
        """``<audio_N>`` per mixed code, no separators (the LLM prompt's audio tokens)."""
        return audio_tokens.audio_string(self.mixed)


# --------------------------------------------------------------------------- pure functions

def energy_norm(wav: np.ndarray) -> np.ndarray:
    """Peak-normalise to 0.999 (never amplifying by more than 0.999/0.01); float32 ``[N]``."""
    peak = max(float(np.abs(wav).max()) if len(wav) else 0.0, NORM_FLOOR)
    return (wav / np.float32(peak) * np.float32(PEAK)).astype(np.float32)


def trim_silence(wav: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """Cut leading/trailing silence as the reference does, at 16 kHz.

    librosa's trim (20 dB below the maximum, 512/128 frames) gives the sound ``[s, e)``; the output
    starts 50 ms before ``s`` (zero-padded if that is before the clip) and is exactly
    ``ceil((e - s) / 240) * 240 + 4320`` samples long (truncated or zero-padded at the end).

    Returns:
        (trimmed ``[M]`` float32, (s, e)).
    """
    _, (start, end) = librosa.effects.trim(wav, top_db=TRIM_TOP_DB, frame_length=TRIM_FRAME, hop_length=TRIM_HOP)
    start, end = int(start), int(end)
    out_len = math.ceil((end - start) / TRIM_HOP_SIZE) * TRIM_HOP_SIZE + KEEP_LEFT + KEEP_RIGHT
    first = start - KEEP_LEFT
    body = wav[first:] if first > 0 else np.concatenate([np.zeros(-first, np.float32), wav])
    body = body[:out_len]
    if len(body) < out_len:
        body = np.concatenate([body, np.zeros(out_len - len(body), np.float32)])
    return body.astype(np.float32, copy=False), (start, end)


@lru_cache(maxsize=1)
def _mel_filters() -> torch.Tensor:
    # Equal to whisper's mel_filters.npz["mel_128"] (max diff 0), so no openai-whisper dependency.
    return torch.from_numpy(librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS))


def whisper_log_mel(wav: np.ndarray) -> np.ndarray:
    """Whisper's log-mel with 128 bins: ``[N]`` 16 kHz -> ``[1, 128, N // 160]`` float32.

    STFT 400/160 with a periodic Hann window (last frame dropped), power, mel, log10 clamped at
    1e-10, floored 8 below the maximum, then ``(x + 4) / 4``.
    """
    x = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))
    stft = torch.stft(x, N_FFT, MEL_HOP, window=torch.hann_window(N_FFT), return_complex=True)
    power = stft[..., :-1].abs() ** 2
    mel = _mel_filters() @ power
    logmel = torch.clamp(mel, min=1e-10).log10()
    logmel = torch.maximum(logmel, logmel.max() - 8.0)
    return ((logmel + 4.0) / 4.0)[None].numpy()


def kmeans_assign(enc_out: torch.Tensor, codebook: torch.Tensor) -> np.ndarray:
    """Index of the nearest centroid (Euclidean) per frame: ``[T, D]`` x ``[K, D]`` -> ``[T]`` int64.

    Runs in float32 on the CPU, as the reference does: on CUDA, TF32 matmuls inside ``cdist``
    would perturb the distances enough to flip near-tie codes.
    """
    return torch.cdist(enc_out.detach().float().cpu(), codebook.float().cpu()).argmin(dim=1).numpy()


def vq06_chunks(wav: np.ndarray) -> list[np.ndarray]:
    """30 s pieces of ``wav``; a final piece under 30 ms is dropped."""
    pieces = [wav[i:i + VQ06_CHUNK] for i in range(0, len(wav), VQ06_CHUNK)]
    return [p for p in pieces if len(p) >= VQ06_MIN_CHUNK]


# --------------------------------------------------------------------------- the tokenizer

class StepAudioTokenizer:
    """Loaded ``Step-Audio-Tokenizer`` models; thread-safe. Build it with :meth:`load`.

    ``folder`` and :attr:`model_files` name what determines its output (with
    :data:`PREPROCESS_VERSION`), so that a cache can key tokens by them.
    """

    def __init__(self, paraformer: ParaformerStream, codebook: torch.Tensor, session, onnx_options: OnnxOptions,
                 folder: Path, device: torch.device) -> None:
        self.paraformer = paraformer
        self.codebook = codebook
        self.vq06_session = session
        self.onnx_options = onnx_options
        self.folder = Path(folder)
        self.device = device
        inputs = session.get_inputs()
        self._vq06_inputs = (inputs[0].name, inputs[1].name)

    @classmethod
    def load(cls, folder: Path, onnx_options: OnnxOptions = OnnxOptions(),
             device: str | torch.device = "cpu", vq02_encoder: str = "parallel") -> "StepAudioTokenizer":
        """Load the tokenizer folder (layout of pipeline.md §2.1).

        Parameters:
            folder: the ``Step-Audio-Tokenizer`` folder.
            onnx_options: ONNX Runtime threads/mode/TensorRT of the vq06 session (its CUDA provider
                is used when ``device`` is CUDA). TF32 is the caller's (``core.devices.configure_tf32``).
            device: torch device of the Paraformer encoder.
            vq02_encoder: ``parallel`` (all chunks per layer at once) or ``streaming`` (funasr's
                chunk-by-chunk loop, the reference); both give the same codes.
        Raises:
            ModelError: a missing file (named), or a model that cannot be loaded.
        """
        folder, device = Path(folder), torch.device(device)
        if not folder.is_dir():
            raise ModelError(f"tokenizer folder not found: {folder}")
        for name in (CODEBOOK_FILE, ONNX_FILE, FUNASR_SUBDIR):
            if not (folder / name).exists():
                raise ModelError(f"the tokenizer folder {folder} lacks {name}")
        paraformer = ParaformerStream.load(folder / FUNASR_SUBDIR, device, vq02_encoder)
        codebook = _load_codebook(folder / CODEBOOK_FILE, paraformer.output_size)  # stays on the CPU
        if onnx_options.use_cuda != (device.type == "cuda"):
            onnx_options = dataclasses.replace(onnx_options, use_cuda=device.type == "cuda")
        try:
            session = create_session(folder / ONNX_FILE, onnx_options)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            raise ModelError(f"could not load {ONNX_FILE}: {exc}") from None
        if len(session.get_inputs()) < 2 or not session.get_outputs():
            raise ModelError(f"{ONNX_FILE} must take (mel, length) and return codes")
        _warm_up_trim()
        return cls(paraformer, codebook, session, onnx_options, folder, device)

    @property
    def model_files(self) -> list[Path]:
        """Every file whose content shapes the tokens."""
        return [self.folder / CODEBOOK_FILE, self.folder / ONNX_FILE, *self.paraformer.files.all()]

    # -------------------------------------------------------------- stages

    def preprocess(self, audio: Audio) -> np.ndarray:
        """Clip -> ``[N]`` float32 at 16 kHz, peak 0.999, silence trimmed.

        Raises:
            InputError: empty, non-finite, silent, or under 120 ms of sound after trimming.
        """
        samples = _check_audio(audio)
        wav = resample(samples, audio.sample_rate, SAMPLE_RATE)
        if float(np.abs(wav).max()) < SILENCE_PEAK:
            raise InputError("the prompt clip is silent; record or upload a clip with speech")
        trimmed, (start, end) = trim_silence(energy_norm(wav))
        if end - start < MIN_SPEECH_SAMPLES:
            raise InputError(f"the prompt clip has only {1000 * (end - start) / SAMPLE_RATE:.0f} ms of sound "
                             f"after trimming silence; at least {1000 * MIN_SPEECH_SAMPLES // SAMPLE_RATE} ms needed")
        return trimmed

    def encode_vq02(self, wav: np.ndarray) -> tuple[int, ...]:
        """Linguistic codes (16.67 Hz) of a preprocessed clip."""
        enc = self.paraformer.encode(wav).enc_out
        return tuple(int(c) for c in kmeans_assign(enc, self.codebook))

    def encode_vq06(self, wav: np.ndarray) -> tuple[int, ...]:
        """Semantic codes (25 Hz) of a preprocessed clip, 30 s per ONNX call.

        Raises:
            ModelError: the ONNX model failed or returned a count far from 25 per second.
        """
        codes: list[int] = []
        for chunk in vq06_chunks(wav):
            mel = whisper_log_mel(chunk)
            feeds = {self._vq06_inputs[0]: mel, self._vq06_inputs[1]: np.array([mel.shape[2]], np.int32)}
            try:
                out = np.asarray(self.vq06_session.run(None, feeds)[0]).reshape(-1)
            except Exception as exc:  # noqa: BLE001 - ORT raises its own types (bad model, out of memory)
                raise ModelError(f"{ONNX_FILE} failed on a {len(chunk) / SAMPLE_RATE:.2f} s chunk: {exc}") from None
            expected = round(len(chunk) / SAMPLE_RATE, 2) * 25
            if abs(len(out) - expected) > VQ06_TOLERANCE:
                raise ModelError(f"{ONNX_FILE} returned {len(out)} codes for {len(chunk) / SAMPLE_RATE:.2f} s; "
                                 f"expected about {expected:.0f} (25 per second)")
            codes += [int(c) for c in out]
        return tuple(codes)

    # -------------------------------------------------------------- request

    def tokenize(self, audio: Audio, timer: Timer | None = None) -> Tokens:
        """The tokens of ``audio``; every call runs the models.

        Parameters:
            audio: the decoded clip (any rate, mono), not peak-limited or trimmed.
            timer: when given, gets stages ``tokenize_preprocess``, ``tokenize_vq02``,
                ``tokenize_vq06``, ``tokenize_merge``.
        Raises:
            InputError: see :meth:`preprocess`; a clip too short for one group. ModelError: a model
                misbehaved.
        """
        timer = timer or Timer()
        with timer.stage("tokenize_preprocess"):
            wav = self.preprocess(audio)
        with timer.stage("tokenize_vq02"):
            vq02 = self.encode_vq02(wav)
        with timer.stage("tokenize_vq06"):
            vq06 = self.encode_vq06(wav)
        with timer.stage("tokenize_merge"):
            return _merge(vq02, vq06)


# --------------------------------------------------------------------------- helpers

def _check_audio(audio: Audio) -> np.ndarray:
    samples = audio.samples
    if len(samples) == 0:
        raise InputError("the prompt clip is empty (0 samples)")
    if not np.isfinite(samples).all():
        raise InputError("the prompt clip contains NaN or infinite samples")
    return samples


def _merge(vq02: tuple[int, ...], vq06: tuple[int, ...]) -> Tokens:
    try:
        tokens = Tokens(vq02, vq06)
    except ValueError as exc:
        raise ModelError(f"the tokenizer models produced invalid codes: {exc}") from None
    if tokens.n_groups == 0:
        raise InputError("the prompt clip is too short to give any audio tokens")
    return tokens


def _warm_up_trim() -> None:
    """Run librosa's trim once at load: with a cold numba cache its first call compiles for ~15 s,
    which would otherwise land on the first user's request."""
    start = time.perf_counter()
    trim_silence(np.sin(np.arange(SAMPLE_RATE, dtype=np.float32) * 0.05))
    log.debug("preprocessing warm-up took %.1f ms", (time.perf_counter() - start) * 1000.0)


def _load_codebook(path: Path, dim: int) -> torch.Tensor:
    """``[K, D]`` float32 centroids, K <= 1024, D = the encoder size."""
    try:
        codebook = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ModelError(f"could not read {path.name}: {exc}") from None
    if codebook.ndim != 2 or codebook.shape[1] != dim or not 0 < codebook.shape[0] <= VQ02_CODES:
        raise ModelError(f"{path.name} has shape {codebook.shape}; expected [K <= {VQ02_CODES}, {dim}]")
    if not np.issubdtype(codebook.dtype, np.number) or not np.isfinite(codebook).all():
        raise ModelError(f"{path.name} holds non-numeric or non-finite centroids")
    return torch.from_numpy(codebook.astype(np.float32))
