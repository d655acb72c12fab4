"""Signal checks: cheap measurements of a take that need no model.

Owns: ``score_signal`` / ``SignalScore`` -- peak and clipping, leading and trailing silence,
integrated loudness (ITU-R BS.1770 LUFS, by pyloudnorm), and the duration of the voiced span against
the text's expected speaking time (``expected_seconds``) -- and the flags they raise.
Does not own: thresholds a user sets per request (``quality.gates``); the flags' limits are here
because they describe a broken take, not a preference.

Silence: 10 ms frames whose RMS is below ``SILENCE_DB`` relative to the loudest frame (and below
-30 dBFS absolute, so a quiet but steady take is not all "silence"). Expected speaking time: 2.5 words
per second (150 words a minute) for non-Chinese text, 4.5 characters per second for Chinese, both
typical read-speech rates; the ratio uses the voiced span (the take minus its leading and trailing
silence), so a long silent tail is its own flag and does not also read as slow speech.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyloudnorm

from core.audio_io import Audio
from quality.content import is_chinese, normalise

CLIP_LEVEL = 0.999            # |sample| at or above this counts as clipped (float full scale is 1.0)
CLIP_FRACTION_FLAG = 0.001    # more than 0.1 % of samples clipped: audible distortion
FRAME_S = 0.010
SILENCE_DB = -40.0            # relative to the loudest 10 ms frame
SILENCE_ABS_DB = -30.0        # and below this absolute level (dBFS)
LEADING_SILENCE_FLAG_S = 1.0
TRAILING_SILENCE_FLAG_S = 1.5
WORDS_PER_S = 2.5             # 150 words a minute
HAN_CHARS_PER_S = 4.5
SHORT_RATIO, LONG_RATIO = 0.5, 2.0   # voiced span vs expected speaking time
LOUDNESS_MIN_S = 0.4          # BS.1770 gating blocks are 400 ms; shorter audio has no integrated loudness


def expected_seconds(text: str) -> float:
    """Typical time to read ``text`` aloud (0.0 when it has nothing to say)."""
    chinese = is_chinese(text)
    units = normalise(text, chinese)
    if chinese:
        return len(units) / HAN_CHARS_PER_S
    return len(units.split()) / WORDS_PER_S


@dataclass(frozen=True)
class SignalScore:
    """Measurements of one take; ``lufs`` is None for silent or sub-0.4 s audio."""

    duration_s: float
    peak: float
    clipped_fraction: float
    leading_silence_s: float
    trailing_silence_s: float
    lufs: float | None
    expected_s: float
    duration_ratio: float | None      # voiced span / expected_s (None without text)
    flags: tuple[str, ...]

    def as_dict(self) -> dict:
        r = lambda v, n=3: None if v is None else round(v, n)  # noqa: E731
        return {"duration_s": r(self.duration_s), "peak": r(self.peak, 4), "clipped_fraction": r(self.clipped_fraction, 5),
                "leading_silence_s": r(self.leading_silence_s), "trailing_silence_s": r(self.trailing_silence_s),
                "lufs": r(self.lufs, 2), "expected_s": r(self.expected_s), "duration_ratio": r(self.duration_ratio),
                "flags": list(self.flags)}


def _silences(samples: np.ndarray, rate: int) -> tuple[float, float, bool]:
    """(leading, trailing) silence in seconds, and whether the whole take is silent."""
    hop = max(1, int(round(FRAME_S * rate)))
    n = len(samples) // hop
    if n == 0:
        return len(samples) / rate, 0.0, True
    frames = samples[: n * hop].reshape(n, hop).astype(np.float64)
    rms_db = 10.0 * np.log10(np.mean(frames * frames, axis=1) + 1e-20)
    threshold = min(float(rms_db.max()) + SILENCE_DB, SILENCE_ABS_DB)
    voiced = np.flatnonzero(rms_db > threshold)
    if voiced.size == 0 or rms_db.max() < -70.0:
        return len(samples) / rate, 0.0, True
    lead = voiced[0] * hop / rate
    trail = (len(samples) - (voiced[-1] + 1) * hop) / rate
    return lead, trail, False


def _loudness(samples: np.ndarray, rate: int) -> float | None:
    if len(samples) < LOUDNESS_MIN_S * rate:
        return None
    value = float(pyloudnorm.Meter(rate).integrated_loudness(samples.astype(np.float64)))
    return value if math.isfinite(value) else None


def score_signal(audio: Audio, text: str = "") -> SignalScore:
    """Measure ``audio`` (mono, any rate); ``text`` is what it should say (for the duration check).

    Flags: ``silent``, ``clipping``, ``leading_silence``, ``trailing_silence``, ``too_short``, ``too_long``.
    """
    samples, rate = np.asarray(audio.samples, np.float32), audio.sample_rate
    duration = len(samples) / rate
    peak = float(np.max(np.abs(samples))) if samples.size else 0.0
    clipped = float(np.mean(np.abs(samples) >= CLIP_LEVEL)) if samples.size else 0.0
    lead, trail, silent = _silences(samples, rate)
    expected = expected_seconds(text) if text else 0.0
    ratio = (max(0.0, duration - lead - trail) / expected) if expected > 0 else None
    flags = []
    if silent:
        flags.append("silent")
    if clipped > CLIP_FRACTION_FLAG:
        flags.append("clipping")
    if not silent and lead > LEADING_SILENCE_FLAG_S:
        flags.append("leading_silence")
    if not silent and trail > TRAILING_SILENCE_FLAG_S:
        flags.append("trailing_silence")
    if ratio is not None and not silent:
        if ratio < SHORT_RATIO:
            flags.append("too_short")
        elif ratio > LONG_RATIO:
            flags.append("too_long")
    return SignalScore(duration, peak, clipped, lead, trail, _loudness(samples, rate), expected, ratio, tuple(flags))
