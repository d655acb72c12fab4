"""WORLD analysis of speech and adaptation of one voice towards another (the preview's "cloning").

Owns: the WORLD parameter record (:class:`WorldParams`), the per-voice statistics that the prompt
cache stores (:class:`VoiceProfile`: log-F0 mean/std over voiced frames, long-term average
spectral envelope, loudness, speech duration), the frequency-warping factor that maps one
envelope's formants onto another's, and :func:`adapt`, which re-shapes synthetic speech with a
prompt's pitch statistics and warped, equalised envelope.
Does not own: text-to-speech (``preview.espeak``), edit presets (``preview.effects``), caching.

Shapes: ``T`` = WORLD frames (one every ``frame_period_ms``), ``K`` = ``fft_size // 2 + 1``
envelope bins (513 at 24 kHz).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
import soxr

from core.errors import InputError

with warnings.catch_warnings():
    # pyworld 0.3.5 imports pkg_resources, which warns on every import with setuptools 80.
    warnings.simplefilter("ignore")
    import pyworld

log = logging.getLogger(__name__)

SAMPLE_RATE = 24000          # the engine's output rate; all WORLD work happens here
FRAME_PERIOD_MS = 5.0
F0_FLOOR, F0_CEIL = 60.0, 700.0
_F0_RATE = 16000             # harvest runs on a 16 kHz copy: F0 needs no more, and it is ~1.4x faster
_MIN_VOICED_FRAMES = 20      # 0.1 s of voicing, below which pitch statistics mean nothing
_WARP_BAND_HZ = (150.0, 5000.0)
_WARP_GRID = np.round(np.arange(0.70, 1.451, 0.01), 2)
_EQ_LIMIT_DB = 12.0          # the long-term equaliser never boosts or cuts more than this
_SILENCE_TOP_DB = 35.0


@dataclass(frozen=True)
class WorldParams:
    """WORLD's decomposition of one clip.

    f0: ``[T]`` Hz, 0 where unvoiced. sp: ``[T, K]`` power spectral envelope. ap: ``[T, K]``
    aperiodicity in [0, 1].
    """

    f0: np.ndarray
    sp: np.ndarray
    ap: np.ndarray
    sample_rate: int = SAMPLE_RATE
    frame_period_ms: float = FRAME_PERIOD_MS

    def __post_init__(self) -> None:
        if self.sp.shape != self.ap.shape or self.sp.shape[0] != self.f0.shape[0]:
            raise ValueError(f"WorldParams shapes disagree: f0 {self.f0.shape}, sp {self.sp.shape}, ap {self.ap.shape}")

    def replace(self, **changes) -> "WorldParams":
        fields = {"f0": self.f0, "sp": self.sp, "ap": self.ap, "sample_rate": self.sample_rate,
                  "frame_period_ms": self.frame_period_ms}
        fields.update(changes)
        return WorldParams(**fields)


@dataclass(frozen=True)
class VoiceProfile:
    """What the preview engine keeps of a voice.

    f0_log_mean, f0_log_std: natural-log F0 statistics over voiced frames. envelope_db: ``[K]``
    mean spectral envelope over voiced frames in dB (at :data:`SAMPLE_RATE`). loudness_db: RMS of
    the non-silent parts in dBFS. speech_seconds: duration of the non-silent parts.
    """

    f0_log_mean: float
    f0_log_std: float
    voiced_fraction: float
    loudness_db: float
    speech_seconds: float
    envelope_db: np.ndarray

    @property
    def median_f0_hz(self) -> float:
        return float(np.exp(self.f0_log_mean))

    def to_cache(self) -> tuple[dict, dict[str, np.ndarray]]:
        """(JSON payload, arrays) for :meth:`funasr_cache.PromptCache.put`."""
        payload = {"f0_log_mean": self.f0_log_mean, "f0_log_std": self.f0_log_std,
                   "voiced_fraction": self.voiced_fraction, "loudness_db": self.loudness_db,
                   "speech_seconds": self.speech_seconds, "sample_rate": SAMPLE_RATE}
        return payload, {"envelope_db": self.envelope_db.astype(np.float32)}

    @classmethod
    def from_cache(cls, payload, arrays) -> "VoiceProfile":
        """The profile :meth:`to_cache` stored.

        Raises:
            ValueError: a field is missing, not a finite number, or the envelope is not ``[K]``
                (a damaged entry, or one imported from a bundle that this engine did not write).
        """
        try:
            numbers = [float(payload[name]) for name in
                       ("f0_log_mean", "f0_log_std", "voiced_fraction", "loudness_db", "speech_seconds")]
            envelope = np.asarray(arrays["envelope_db"], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed voice profile ({type(exc).__name__}: {exc})") from None
        if not np.isfinite(numbers).all() or envelope.shape != (_envelope_bins(),) or not np.isfinite(envelope).all():
            raise ValueError(f"malformed voice profile (envelope shape {envelope.shape})")
        return cls(*numbers, envelope)


def analyse(samples: np.ndarray, precise: bool = False) -> WorldParams:
    """WORLD analysis of a 24 kHz clip.

    Parameters:
        samples: ``[N]`` float mono at :data:`SAMPLE_RATE`.
        precise: use Harvest for F0 (robust on real recordings, ~0.1x real time) instead of
            DIO + StoneMask (fine for clean synthetic speech, ~0.01x real time).

    Returns:
        :class:`WorldParams` with one frame every :data:`FRAME_PERIOD_MS`.
    """
    x = np.ascontiguousarray(samples, dtype=np.float64)
    if precise:
        x16 = soxr.resample(x, SAMPLE_RATE, _F0_RATE)
        f0, times = pyworld.harvest(x16, _F0_RATE, f0_floor=F0_FLOOR, f0_ceil=F0_CEIL, frame_period=FRAME_PERIOD_MS)
    else:
        f0, times = pyworld.dio(x, SAMPLE_RATE, f0_floor=F0_FLOOR, f0_ceil=F0_CEIL, frame_period=FRAME_PERIOD_MS)
        f0 = pyworld.stonemask(x, f0, times, SAMPLE_RATE)
    sp = pyworld.cheaptrick(x, f0, times, SAMPLE_RATE)
    ap = pyworld.d4c(x, f0, times, SAMPLE_RATE)
    return WorldParams(f0, sp, ap)


def synthesize(params: WorldParams) -> np.ndarray:
    """WORLD re-synthesis: ``[N]`` float32 samples at ``params.sample_rate``."""
    out = pyworld.synthesize(np.ascontiguousarray(params.f0, dtype=np.float64),
                             np.ascontiguousarray(params.sp, dtype=np.float64),
                             np.ascontiguousarray(params.ap, dtype=np.float64),
                             params.sample_rate, params.frame_period_ms)
    return out.astype(np.float32)


def speech_intervals(samples: np.ndarray, top_db: float = _SILENCE_TOP_DB) -> np.ndarray:
    """``[M, 2]`` sample ranges that are not silence (librosa's energy split)."""
    import librosa

    if not np.any(samples):
        return np.zeros((0, 2), dtype=np.int64)
    return librosa.effects.split(np.asarray(samples, dtype=np.float32), top_db=top_db, frame_length=1024,
                                 hop_length=256)


def loudness_db(samples: np.ndarray) -> float:
    """RMS of the non-silent parts in dBFS (-100 for digital silence)."""
    spans = speech_intervals(samples)
    voiced = np.concatenate([samples[a:b] for a, b in spans]) if len(spans) else np.zeros(0, np.float32)
    rms = float(np.sqrt(np.mean(np.square(voiced, dtype=np.float64)))) if len(voiced) else 0.0
    return 20.0 * np.log10(rms) if rms > 1e-5 else -100.0


def profile(samples: np.ndarray, params: WorldParams, what: str = "the prompt clip") -> VoiceProfile:
    """The :class:`VoiceProfile` of a clip from its samples (24 kHz) and WORLD analysis.

    Raises:
        InputError: the clip has too little voiced speech to measure a voice.
    """
    voiced = params.f0 > 0
    if int(voiced.sum()) < _MIN_VOICED_FRAMES:
        raise InputError(f"{what} has no voiced speech to imitate (found {int(voiced.sum()) * FRAME_PERIOD_MS:.0f} ms "
                         "of pitched sound); use a clip of someone talking")
    log_f0 = np.log(params.f0[voiced])
    envelope = 10.0 * np.log10(np.maximum(params.sp[voiced], 1e-16)).mean(axis=0)
    spans = speech_intervals(samples)
    speech_s = float(sum(b - a for a, b in spans)) / SAMPLE_RATE
    return VoiceProfile(f0_log_mean=float(log_f0.mean()), f0_log_std=float(max(log_f0.std(), 1e-3)),
                        voiced_fraction=float(voiced.mean()), loudness_db=loudness_db(samples),
                        speech_seconds=speech_s, envelope_db=envelope)


def analyse_prompt(samples: np.ndarray) -> VoiceProfile:
    """Precise analysis of a prompt clip (24 kHz ``[N]``), the work the prompt cache saves.

    Raises:
        InputError: no voiced speech in the clip.
    """
    return profile(samples, analyse(samples, precise=True))


def _envelope_bins() -> int:
    """K: the spectral-envelope bins :func:`analyse` produces (CheapTrick's default F0 floor)."""
    return pyworld.get_cheaptrick_fft_size(SAMPLE_RATE) // 2 + 1


def _bin_hz(bins: int) -> np.ndarray:
    return np.linspace(0.0, SAMPLE_RATE / 2.0, bins)


def warp_envelope(sp: np.ndarray, alpha: float) -> np.ndarray:
    """Scale the frequency axis of ``sp`` (``[T, K]`` or ``[K]``) by ``alpha``.

    ``alpha > 1`` moves formants up (a shorter vocal tract): ``out(f) = sp(f / alpha)``.
    """
    if abs(alpha - 1.0) < 1e-6:
        return sp
    bins = sp.shape[-1]
    source = np.clip(np.arange(bins) / alpha, 0, bins - 1)
    lo = np.floor(source).astype(np.int64)
    hi = np.minimum(lo + 1, bins - 1)
    w = source - lo
    return sp[..., lo] * (1.0 - w) + sp[..., hi] * w


def _detrended_band(envelope_db: np.ndarray) -> np.ndarray:
    """The envelope inside the warp band with its overall tilt removed (a quadratic fit)."""
    freqs = _bin_hz(envelope_db.shape[-1])
    band = (freqs >= _WARP_BAND_HZ[0]) & (freqs <= _WARP_BAND_HZ[1])
    x = freqs[band] / 1000.0
    y = envelope_db[band]
    return y - np.polyval(np.polyfit(x, y, 2), x)


def estimate_warp(source_db: np.ndarray, target_db: np.ndarray) -> float:
    """The factor ``alpha`` for which ``warp_envelope(source, alpha)`` best matches ``target``.

    Grid search over 0.70..1.45 of the correlation between tilt-free envelopes (``[K]`` dB each),
    with a small penalty on large warps so that flat evidence keeps ``alpha`` near 1.
    """
    target = _detrended_band(target_db)
    best, best_score = 1.0, -np.inf
    for alpha in _WARP_GRID:
        candidate = _detrended_band(warp_envelope(source_db, float(alpha)))
        score = float(np.corrcoef(candidate, target)[0, 1]) - 0.3 * abs(np.log(alpha))
        if score > best_score:
            best, best_score = float(alpha), score
    return best


def _smooth(values: np.ndarray, width: int) -> np.ndarray:
    kernel = np.hanning(2 * width + 1)
    kernel /= kernel.sum()
    padded = np.pad(values, width, mode="edge")
    return np.convolve(padded, kernel, mode="valid")


def adapt(params: WorldParams, source: VoiceProfile, target: VoiceProfile) -> tuple[WorldParams, float]:
    """Re-shape ``params`` (of the voice ``source``) towards the voice ``target``.

    Pitch: voiced log-F0 is standardised with ``source``'s mean/std and mapped onto ``target``'s.
    Timbre: the envelope is frequency-warped by :func:`estimate_warp`, then a smooth long-term
    equaliser (limited to +-12 dB, level-neutral) matches the warped average envelope to the
    target's.

    Returns:
        (adapted params, warp factor alpha).
    """
    alpha = estimate_warp(source.envelope_db, target.envelope_db)
    f0 = params.f0.copy()
    voiced = f0 > 0
    z = (np.log(f0[voiced]) - source.f0_log_mean) / source.f0_log_std
    f0[voiced] = np.clip(np.exp(target.f0_log_mean + z * target.f0_log_std), F0_FLOOR, F0_CEIL)
    sp = warp_envelope(params.sp, alpha)
    warped_db = warp_envelope(source.envelope_db, alpha)
    correction = np.clip(_smooth(target.envelope_db - warped_db, 8), -_EQ_LIMIT_DB, _EQ_LIMIT_DB)
    freqs = _bin_hz(len(correction))
    band = (freqs >= _WARP_BAND_HZ[0]) & (freqs <= _WARP_BAND_HZ[1])
    correction -= correction[band].mean()  # level is matched later, on the waveform
    sp = sp * (10.0 ** (correction / 10.0))[None, :]
    return params.replace(f0=f0, sp=sp), alpha
