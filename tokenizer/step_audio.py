"""Step-Audio's dual-codebook audio tokenizer: a prompt clip in, vq02 + vq06 codes out, cache-first.

Owns: the tokenizer's preprocessing (16 kHz, peak 0.999, silence trim with the reference's
margins), vq02 (streaming Paraformer encoder -> nearest k-means centroid), vq06 (128-bin
whisper-style log-mel -> S3 ONNX tokenizer, 30 s chunks), the 2:3 interleave into LLM ids and the
``<audio_N>`` string, loading the ``Step-Audio-Tokenizer`` folder, and caching tokens per clip
(kind ``tokens``). Does not own: decoding uploads (``audio_io``), the cache mechanics
(``funasr_cache``), the Paraformer streaming loop (``paraformer_stream``), prompt templates.

Shape legend:
    N   samples at 16 kHz
    T   LFR frames (vq02, 16.67 Hz) or mel frames (100 Hz) as stated
    D   Paraformer encoder size (512 real), K k-means centroids (1024 real)

Rates and ids (pipeline.md §1.4): vq02 0..1023 at 16.67 Hz, vq06 0..4095 at 25 Hz; one 120 ms
group is ``[vq02 x2, vq06 x3]``; LLM id = 65536 + N with N = vq02 or 1024 + vq06.

The upstream ``tts.py`` limits the clip to peak 0.6 before tokenizing; :meth:`tokenize` does not,
because the energy normalisation rescales to 0.999 anyway and the trim threshold is relative to the
clip's maximum (both scale-invariant; only float rounding differs). The golden ``wav_in`` is the
limited clip and reproduces exactly either way.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import librosa
import numpy as np
import torch

from core.audio_io import Audio, resample
from core.devices import configure_tf32
from core.errors import InputError, ModelError
from prompt_cache.funasr_cache import PromptCache, audio_digest, fingerprint_files, make_namespace
from core.onnx_session import OnnxOptions, create_session
from tokenizer.paraformer_stream import ParaformerStream
from core.settings import FUNASR_SUBDIR, Settings
from core.timings import StageTimings, Timer

log = logging.getLogger(__name__)

PREPROCESS_VERSION = 1            # bump when preprocessing or token layout changes: old cache entries miss
CACHE_KIND = "tokens"
SAMPLE_RATE = 16000
PEAK = 0.999                      # energy_norm target
NORM_FLOOR = 0.01                 # energy_norm never scales by more than PEAK / 0.01
SILENCE_PEAK = 1.0 / 32768        # below one 16-bit step the clip is digital silence
TRIM_TOP_DB, TRIM_FRAME, TRIM_HOP = 20, 512, 128
KEEP_LEFT = 800                   # 0.05 s of context kept before the first non-silent sample
KEEP_RIGHT = 3520                 # 0.22 s after the last one
TRIM_HOP_SIZE = 240               # output length is a multiple of 240 samples + KEEP_LEFT + KEEP_RIGHT
MIN_SPEECH_SAMPLES = 1920         # 120 ms = one LLM token group; shorter sound cannot carry a voice
VQ02_CODES, VQ06_CODES = 1024, 4096
AUDIO_ID_OFFSET = 65536
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
        return min(len(self.vq02) // 2, len(self.vq06) // 3)

    @property
    def mixed(self) -> tuple[int, ...]:
        """Interleaved codes N in 0..5119 (vq02, or 1024 + vq06): what the decoder takes."""
        return interleave(self.vq02, self.vq06)

    @property
    def llm_ids(self) -> tuple[int, ...]:
        """LLM token ids, 65536 + :attr:`mixed`."""
        return tuple(AUDIO_ID_OFFSET + n for n in self.mixed)

    @property
    def audio_string(self) -> str:
        """``<audio_N>`` per mixed code, no separators (the LLM prompt's audio tokens)."""
        return "".join(f"<audio_{n}>" for n in self.mixed)


@dataclass(frozen=True)
class TokenizeResult:
    tokens: Tokens
    digest: str             # cache digest of the decoded input clip
    hit: bool               # True when the tokens came from the cache
    timings: StageTimings


# --------------------------------------------------------------------------- pure functions

def interleave(vq02, vq06) -> tuple[int, ...]:
    """Mixed codes ``[a, b, 1024+c, 1024+d, 1024+e]`` per group; excess codes are dropped."""
    n = min(len(vq02) // 2, len(vq06) // 3)
    out: list[int] = []
    for g in range(n):
        out += [int(vq02[2 * g]), int(vq02[2 * g + 1])]
        out += [VQ02_CODES + int(c) for c in vq06[3 * g:3 * g + 3]]
    return tuple(out)


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
    """Loaded ``Step-Audio-Tokenizer`` models plus the prompt cache; thread-safe.

    Build it with :meth:`load`. ``namespace`` is the cache namespace of its tokens.
    """

    def __init__(self, paraformer: ParaformerStream, codebook: torch.Tensor, session, onnx_options: OnnxOptions,
                 cache: PromptCache, namespace: str, device: torch.device) -> None:
        self.paraformer = paraformer
        self.codebook = codebook
        self.vq06_session = session
        self.onnx_options = onnx_options
        self.cache = cache
        self.namespace = namespace
        self.device = device
        inputs = session.get_inputs()
        self._vq06_inputs = (inputs[0].name, inputs[1].name)

    @classmethod
    def load(cls, folder: Path, settings: Settings, cache: PromptCache,
             device: str | torch.device = "cpu") -> "StepAudioTokenizer":
        """Load the tokenizer folder (layout of pipeline.md §2.1).

        Parameters:
            folder: the ``Step-Audio-Tokenizer`` folder.
            settings: ONNX Runtime threads/mode/TensorRT, ``tf32`` and ``vq02_encoder`` are read from it.
            cache: where tokens are cached.
            device: torch device of the Paraformer encoder; CUDA also selects ORT's CUDA provider.
        Raises:
            ModelError: a missing file (named), or a model that cannot be loaded.
        """
        folder, device = Path(folder), torch.device(device)
        if not folder.is_dir():
            raise ModelError(f"tokenizer folder not found: {folder}")
        for name in (CODEBOOK_FILE, ONNX_FILE, FUNASR_SUBDIR):
            if not (folder / name).exists():
                raise ModelError(f"the tokenizer folder {folder} lacks {name}")
        configure_tf32(settings.tf32)
        paraformer = ParaformerStream.load(folder / FUNASR_SUBDIR, device, settings.vq02_encoder)
        codebook = _load_codebook(folder / CODEBOOK_FILE, paraformer.output_size)  # stays on the CPU
        options = OnnxOptions.from_settings(settings, use_cuda=device.type == "cuda")
        try:
            session = create_session(folder / ONNX_FILE, options)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            raise ModelError(f"could not load {ONNX_FILE}: {exc}") from None
        if len(session.get_inputs()) < 2 or not session.get_outputs():
            raise ModelError(f"{ONNX_FILE} must take (mel, length) and return codes")
        _warm_up_trim()
        files = [folder / CODEBOOK_FILE, folder / ONNX_FILE, *paraformer.files.all()]
        namespace = make_namespace(folder.name, fingerprint_files(files), PREPROCESS_VERSION)
        return cls(paraformer, codebook, session, options, cache, namespace, device)

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

    def _encode(self, audio: Audio, timer: Timer) -> Tokens:
        """The miss path: preprocess, both encoders, merge (each a stage of ``timer``)."""
        with timer.stage("preprocess"):
            wav = self.preprocess(audio)
        with timer.stage("vq02_encode"):
            vq02 = self.encode_vq02(wav)
        with timer.stage("vq06_encode"):
            vq06 = self.encode_vq06(wav)
        with timer.stage("merge"):
            return _merge(vq02, vq06)

    # -------------------------------------------------------------- request

    def tokenize(self, audio: Audio, digest: str | None = None) -> TokenizeResult:
        """Tokens of ``audio``, from the cache when this clip was tokenized before.

        Parameters:
            audio: the decoded clip (any rate, mono), not peak-limited or trimmed.
            digest: ``funasr_cache.audio_digest`` of ``audio``; computed when None.
        Returns:
            :class:`TokenizeResult` with stages hash, cache_lookup, and on a miss preprocess,
            vq02_encode, vq06_encode, merge. When a concurrent request for the same clip did the
            encoding, only hash and cache_lookup (which includes the wait) and counter coalesced=1.
        Raises:
            InputError: see :meth:`preprocess`. ModelError: a model misbehaved.
        """
        timer = Timer()
        _check_audio(audio)
        with timer.stage("hash"):
            digest = digest or audio_digest(audio.samples, audio.sample_rate)
        computed: list[Tokens] = []
        looked_up = time.perf_counter()

        def since_lookup() -> float:
            return (time.perf_counter() - looked_up) * 1000.0

        def compute() -> tuple[dict, None]:
            timer.record("cache_lookup", since_lookup())
            computed.append(self._encode(audio, timer))
            return _payload(computed[0]), None

        # One call: a hit, our own encoding (stored), or -- for concurrent misses of one clip --
        # the encoding another request did while we waited: the cache single-flights per key.
        entry, hit = self.cache.get_or_compute(CACHE_KIND, self.namespace, digest, compute)
        tokens = computed[0] if computed else _tokens_from_entry(entry)
        if tokens is None:  # a malformed entry: recompute and replace it
            hit = False
            timer.record("cache_lookup", since_lookup())
            start = time.perf_counter()
            tokens = self._encode(audio, timer)
            self.cache.put(CACHE_KIND, self.namespace, digest, _payload(tokens), time.perf_counter() - start)
        elif not computed:
            timer.record("cache_lookup", since_lookup(), cached=hit)
            if not hit:
                timer.set_counter("coalesced", 1)  # the lookup time includes the wait
        timer.set_counter("groups", tokens.n_groups)
        timings = timer.finish()
        _log_request(digest, hit, timings)
        return TokenizeResult(tokens, digest, hit, timings)


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


def _payload(tokens: Tokens) -> dict:
    return {"vq02": list(tokens.vq02), "vq06": list(tokens.vq06)}


def _tokens_from_entry(entry) -> Tokens | None:
    """Tokens of a cache entry, or None when absent or malformed (then it is recomputed)."""
    if entry is None:
        return None
    try:
        tokens = Tokens(tuple(entry.payload["vq02"]), tuple(entry.payload["vq06"]))
        if tokens.n_groups == 0:  # _merge never stores these; a bundle cannot be built from them
            raise ValueError("no whole token group")
        return tokens
    except (KeyError, TypeError, ValueError):
        log.warning("ignoring a malformed tokens cache entry %s", entry.digest[:12])
        return None


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


def _log_request(digest: str, hit: bool, t: StageTimings) -> None:
    ms = t.stages_ms
    line = (f"FunASR cache {'HIT' if hit else 'MISS'} {digest[:12]}: hash {ms['hash']:.1f} ms, "
            f"lookup {ms['cache_lookup']:.1f} ms")
    if t.counters.get("coalesced"):
        line += " (waiting for a concurrent request's encoding of the same clip)"
    elif not hit:
        encode_s = sum(ms[k] for k in ("preprocess", "vq02_encode", "vq06_encode", "merge")) / 1000.0
        line += (f"; FunASR encoding: {encode_s:.3f} s (preprocess {ms['preprocess']:.1f} ms, "
                 f"vq02 {ms['vq02_encode']:.1f} ms, vq06 {ms['vq06_encode']:.1f} ms, merge {ms['merge']:.1f} ms)")
    log.info("%s; %d groups, total %.1f ms", line, int(t.counters["groups"]), t.total_ms)
