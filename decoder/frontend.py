"""Prompt features for the decoder: the 24 kHz log-mel and the CAM++ speaker embedding.

Owns: turning a prompt clip into what the flow is conditioned on (reference
``CosyVoiceFrontEnd.extract_speech_feat``/``extract_spk_embedding`` after ``tts.py``'s 0.6 peak
limiter): ``mel`` [T, 80] at 50 Hz and ``embedding`` [192]. Does not own: the nearest-neighbour
stretch of the mel to the prompt tokens (token2wav does that), tokenisation, or trimming (the
prompt features come from the *untrimmed* clip).

Shape legend:
    N  samples at the clip's rate; N24 / N16 after resampling to 24 / 16 kHz
    T  mel frames = (N24 + 2*pad - n_fft) // hop + 1 with pad = (n_fft - hop) / 2, i.e. N24 // hop
    K  fbank frames = 1 + (N16 - 400) // 160 (25 ms windows, 10 ms shift, snip edges)

Thread-safety: the mel basis and window are built once and only read; ONNX Runtime sessions
allow concurrent ``run`` calls; fbank extractors are created per call.

Parity: resampling uses the float32-kernel variant of ``audio_io.resample``, which equals
``torchaudio.functional.resample`` bit for bit. The fbank comes from kaldi-native-fbank, not
torchaudio's ``compliance.kaldi.fbank``; the two differ by up to ~2.5e-4 (log domain) in a few
quiet bins, which leaves the CAM++ embedding within 1e-5 of the reference's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import kaldi_native_fbank as knf
import librosa
import numpy as np
import torch

from core.audio_io import Audio, peak_limit, resample
from core.errors import InputError, ModelError
from core.onnx_session import OnnxOptions, create_session
from core.timings import Timer

log = logging.getLogger(__name__)

PROMPT_PEAK = 0.6  # tts.py's preprocess_prompt_wav limiter; only scales down
SPEAKER_RATE = 16000  # CAM++ works on 16 kHz kaldi fbank
EMBEDDING_DIM = 192
_FBANK_WINDOW, _FBANK_SHIFT = 400, 160  # 25 ms / 10 ms at 16 kHz


@dataclass(frozen=True)
class MelConfig:
    """The yaml's ``mel_conf`` (shipped values)."""

    n_fft: int = 1920
    num_mels: int = 80
    sampling_rate: int = 24000
    hop_size: int = 480
    win_size: int = 1920
    fmin: float = 0.0
    fmax: float = 8000.0

    @classmethod
    def from_yaml_kwargs(cls, kwargs: Mapping[str, Any]) -> "MelConfig":
        """Build from the yaml's ``mel_conf`` mapping; all seven keys are required.

        Raises:
            ModelError: a key is missing or unknown, or a value is not a number.
        """
        names = [f.name for f in fields(cls)]
        if not isinstance(kwargs, Mapping) or set(kwargs) != set(names):
            got = sorted(kwargs) if isinstance(kwargs, Mapping) else repr(kwargs)
            raise ModelError(f"mel_conf must have exactly the keys {names}, got {got}")
        try:
            ints = {n: int(kwargs[n]) for n in ("n_fft", "num_mels", "sampling_rate", "hop_size", "win_size")}
            cfg = cls(**ints, fmin=float(kwargs["fmin"]), fmax=float(kwargs["fmax"]))
        except (TypeError, ValueError) as exc:
            raise ModelError(f"mel_conf has a malformed value: {exc}") from None
        if cfg.win_size > cfg.n_fft or cfg.hop_size <= 0 or cfg.n_fft < cfg.hop_size:
            raise ModelError(f"mel_conf is inconsistent: {cfg}")
        return cfg

    @property
    def pad(self) -> int:
        """Reflect padding on each side of the waveform before the (uncentred) STFT."""
        return (self.n_fft - self.hop_size) // 2

    def frames(self, samples: int) -> int:
        """Mel frames for ``samples`` at ``sampling_rate``."""
        return (samples + 2 * self.pad - self.n_fft) // self.hop_size + 1


@dataclass(frozen=True)
class PromptFeatures:
    """mel: float32 [T, num_mels] at ``sampling_rate / hop_size`` Hz; embedding: float32 [192]."""

    mel: np.ndarray
    embedding: np.ndarray


class PromptFrontend:
    """Computes :class:`PromptFeatures` from a prompt clip.

    Parameters:
        mel_cfg: the yaml's ``mel_conf``.
        campplus_path: ``campplus.onnx`` (input 0: float32 [1, K, 80]; output 0: [1, 192]).
        onnx_options: session options from the shared settings.

    Raises:
        ModelError: the ONNX file is missing or cannot be loaded.
    """

    def __init__(self, mel_cfg: MelConfig, campplus_path: str | Path, onnx_options: OnnxOptions) -> None:
        self.mel_cfg = mel_cfg
        basis = librosa.filters.mel(sr=mel_cfg.sampling_rate, n_fft=mel_cfg.n_fft, n_mels=mel_cfg.num_mels,
                                    fmin=mel_cfg.fmin, fmax=mel_cfg.fmax)  # slaney scale and norm
        self._mel_basis = torch.from_numpy(basis).float()  # [num_mels, n_fft/2+1]
        self._window = torch.hann_window(mel_cfg.win_size)
        path = Path(campplus_path)
        if not path.is_file():
            raise ModelError(f"speaker-embedding model not found: {path}")
        try:
            self._session = create_session(path, onnx_options)
        except Exception as exc:  # onnxruntime raises its own unrelated exception types
            raise ModelError(f"could not load {path.name}: {exc}") from None
        self._input_name = self._session.get_inputs()[0].name  # by position, as the reference

    def min_samples(self, sample_rate: int) -> int:
        """The fewest samples at ``sample_rate`` that give one mel frame and one fbank frame."""
        rate_24 = self.mel_cfg.sampling_rate
        # The reflect pad needs more than `pad` samples and one frame needs n_fft - 2*pad more.
        need_24 = max(self.mel_cfg.pad + 1, self.mel_cfg.n_fft - 2 * self.mel_cfg.pad)
        need = max(need_24 / rate_24, _FBANK_WINDOW / SPEAKER_RATE)
        return int(np.ceil(need * sample_rate)) + 1

    def features(self, audio: Audio, timer: Timer | None = None) -> PromptFeatures:
        """Peak-limit to 0.6, then :meth:`mel` and :meth:`embedding` of the untrimmed clip.

        ``timer``, when given, gets stages ``prompt_mel`` and ``speaker_embedding``.

        Raises:
            InputError: the clip is empty, too short for one frame, or not finite.
        """
        timer = timer or Timer()
        samples = peak_limit(self._check(audio.samples, audio.sample_rate), PROMPT_PEAK)
        with timer.stage("prompt_mel"):
            mel = self.mel(samples, audio.sample_rate)
        with timer.stage("speaker_embedding"):
            embedding = self.embedding(samples, audio.sample_rate)
        features = PromptFeatures(mel, embedding)
        log.debug("prompt features: %.2f s at %d Hz -> mel %s", audio.duration, audio.sample_rate, features.mel.shape)
        return features

    def mel(self, samples: np.ndarray, sample_rate: int) -> np.ndarray:
        """Log-mel of a mono clip, as the reference's matcha ``mel_spectrogram``.

        Parameters:
            samples: float32 [N] in [-1, 1] at ``sample_rate`` (resampled to 24 kHz here).

        Returns:
            float32 [T, num_mels], natural-log magnitudes floored at 1e-5.

        Raises:
            InputError: too short for one frame, or not finite.
        """
        cfg = self.mel_cfg
        x = resample(self._check(samples, sample_rate), sample_rate, cfg.sampling_rate, float32_kernel=True)
        if len(x) <= cfg.pad or cfg.frames(len(x)) < 1:
            raise InputError(self._too_short(samples, sample_rate))
        with torch.no_grad():
            y = torch.nn.functional.pad(torch.from_numpy(x)[None, None], (cfg.pad, cfg.pad), mode="reflect")[0]
            spec = torch.stft(y, cfg.n_fft, hop_length=cfg.hop_size, win_length=cfg.win_size, window=self._window,
                              center=False, return_complex=True)
            magnitude = torch.sqrt(spec.real.pow(2) + spec.imag.pow(2) + 1e-9)  # [1, F, T]
            mel = torch.log(torch.clamp(self._mel_basis @ magnitude, min=1e-5))
        return mel[0].T.contiguous().numpy()

    def fbank(self, samples: np.ndarray, sample_rate: int) -> np.ndarray:
        """Mean-normalised kaldi fbank fed to CAM++.

        Parameters:
            samples: float32 [N] in [-1, 1] at ``sample_rate`` (resampled to 16 kHz here).

        Returns:
            float32 [K, 80]: 80 log mel bins (povey window, pre-emphasis 0.97, DC removal,
            no dither), minus their mean over time.

        Raises:
            InputError: too short for one 25 ms frame, or not finite.
        """
        x = resample(self._check(samples, sample_rate), sample_rate, SPEAKER_RATE, float32_kernel=True)
        if len(x) < _FBANK_WINDOW:
            raise InputError(self._too_short(samples, sample_rate))
        opts = knf.FbankOptions()
        opts.frame_opts.samp_freq = SPEAKER_RATE
        opts.frame_opts.dither = 0.0
        opts.mel_opts.num_bins = 80
        # The remaining defaults equal torchaudio.compliance.kaldi.fbank's: povey window,
        # pre-emphasis 0.97, DC removal, 25/10 ms, snip edges, power spectrum, log, no energy.
        extractor = knf.OnlineFbank(opts)
        extractor.accept_waveform(SPEAKER_RATE, x.tolist())  # kaldi scale is the caller's; ±1 here, as upstream
        extractor.input_finished()
        feats = np.array([extractor.get_frame(i) for i in range(extractor.num_frames_ready)], dtype=np.float32)
        return feats - feats.mean(axis=0, keepdims=True)

    def embedding(self, samples: np.ndarray, sample_rate: int) -> np.ndarray:
        """CAM++ speaker embedding of a mono clip: float32 [192].

        Raises:
            InputError: too short or not finite. ModelError: the ONNX model's output is not 192 values.
        """
        feats = self.fbank(samples, sample_rate)
        output = self._session.run(None, {self._input_name: feats[None]})[0]
        embedding = np.asarray(output, dtype=np.float32).reshape(-1)
        if embedding.shape != (EMBEDDING_DIM,):
            raise ModelError(f"campplus.onnx returned {np.shape(output)}; expected {EMBEDDING_DIM} values")
        return embedding

    def _check(self, samples: np.ndarray, sample_rate: int) -> np.ndarray:
        # Writable, because torch.from_numpy warns on the read-only arrays Audio holds.
        samples = np.require(samples, np.float32, ("C", "W"))
        if samples.ndim != 1:
            raise InputError(f"prompt audio must be mono [N], got shape {samples.shape}")
        if sample_rate <= 0:
            raise InputError(f"prompt sample rate must be positive, got {sample_rate}")
        if len(samples) == 0:
            raise InputError("the prompt audio is empty (0 samples)")
        if len(samples) < self.min_samples(sample_rate):
            raise InputError(self._too_short(samples, sample_rate))
        if not np.isfinite(samples).all():
            raise InputError("the prompt audio contains NaN or infinite samples")
        return samples

    def _too_short(self, samples: np.ndarray, sample_rate: int) -> str:
        return (f"the prompt audio is too short ({len(samples)} samples at {sample_rate} Hz); "
                f"it needs at least {self.min_samples(sample_rate) / sample_rate * 1000:.0f} ms")
