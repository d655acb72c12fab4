"""The preview engine's edits, done with signal processing where that is honest.

Owns: the prosody presets behind emotion/style options (pitch level and range, tempo, loudness,
spectral tilt, formant scaling, breathiness, whisper), applying a :class:`Prosody` to WORLD
parameters, pitch-preserving time stretching, seeded pitch "humanising", denoising (spectral
gating by ``noisereduce``) and silence removal, plus the table of which options the preview can
honour and why the others are not offered.
Does not own: WORLD analysis/synthesis (``preview.voice``), request handling (``preview.engine``).

Shapes: ``T`` = WORLD frames, ``K`` = envelope bins, ``N`` = samples at 24 kHz.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from core.edit_options import EMOTIONS, SPEEDS, STYLES
from preview.voice import F0_CEIL, F0_FLOOR, WorldParams, loudness_db, speech_intervals, warp_envelope

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prosody:
    """A change of delivery. Neutral values leave the clip as it is.

    semitones: shift of the pitch level. range_scale: factor on log-F0 deviations from the mean
    (>1 livelier, <1 flatter). target_log_std: if set, the log-F0 spread is set to this instead
    (used by ``remove``). tempo: >1 faster, pitch kept. gain_db: loudness change. tilt_db_per_octave:
    spectral tilt above 1 kHz (raised vocal effort flattens the tilt). formant: envelope frequency
    scale (>1 a shorter vocal tract). breathiness: 0..1 of the way to fully aperiodic. whisper:
    no voicing at all.
    """

    semitones: float = 0.0
    range_scale: float = 1.0
    target_log_std: float | None = None
    tempo: float = 1.0
    gain_db: float = 0.0
    tilt_db_per_octave: float = 0.0
    formant: float = 1.0
    breathiness: float = 0.0
    whisper: bool = False

    def __post_init__(self) -> None:
        if not 0.25 <= self.tempo <= 4.0:
            raise ValueError(f"Prosody.tempo must be in [0.25, 4], not {self.tempo}")
        if not 0.0 <= self.breathiness <= 1.0:
            raise ValueError(f"Prosody.breathiness must be in [0, 1], not {self.breathiness}")


# A neutral delivery spreads log-F0 by about 0.12 (two semitones) around its mean.
_NEUTRAL = Prosody(target_log_std=0.12)

EMOTION_PRESETS: dict[str, Prosody] = {
    "happy": Prosody(semitones=2.0, range_scale=1.3, tempo=1.08, gain_db=2.0, tilt_db_per_octave=1.0),
    "excited": Prosody(semitones=3.0, range_scale=1.5, tempo=1.15, gain_db=3.0, tilt_db_per_octave=1.5),
    "surprised": Prosody(semitones=3.0, range_scale=1.6, tempo=1.0, gain_db=2.0),
    "angry": Prosody(semitones=1.0, range_scale=1.25, tempo=1.08, gain_db=5.0, tilt_db_per_octave=3.0),
    "sad": Prosody(semitones=-2.0, range_scale=0.7, tempo=0.88, gain_db=-3.0, tilt_db_per_octave=-1.5),
    "depressed": Prosody(semitones=-3.0, range_scale=0.5, tempo=0.8, gain_db=-5.0, tilt_db_per_octave=-2.0,
                         breathiness=0.15),
    "coldness": Prosody(semitones=-1.0, range_scale=0.55, tempo=0.95),
    "remove": _NEUTRAL,
}
STYLE_PRESETS: dict[str, Prosody] = {
    "whisper": Prosody(whisper=True, gain_db=-8.0),
    "murmur": Prosody(semitones=-2.0, range_scale=0.6, tempo=0.9, gain_db=-9.0, breathiness=0.5,
                      tilt_db_per_octave=-2.0),
    "shout": Prosody(semitones=4.0, range_scale=1.2, gain_db=8.0, tilt_db_per_octave=4.0),
    "loudly": Prosody(semitones=2.0, gain_db=6.0, tilt_db_per_octave=2.5),
    "roar": Prosody(semitones=1.0, range_scale=1.1, gain_db=8.0, tilt_db_per_octave=4.0, breathiness=0.2),
    "child": Prosody(semitones=7.0, range_scale=1.2, formant=1.18),
    "girl": Prosody(semitones=5.0, range_scale=1.15, formant=1.12),
    "older": Prosody(semitones=-2.0, range_scale=0.85, tempo=0.9, formant=0.95, breathiness=0.1),
    "remove": _NEUTRAL,
}
SPEED_FACTORS: dict[str, float] = {"faster": 1.25, "more faster": 1.5, "slower": 0.8, "more slower": 0.67}
assert set(EMOTION_PRESETS) <= set(EMOTIONS) and set(STYLE_PRESETS) <= set(STYLES) and set(SPEED_FACTORS) == set(SPEEDS)

EMOTION_NOTE = ("preview: done with pitch level/range, tempo and loudness presets; emotions without a clear "
                "acoustic signature need Step-Audio-EditX")
STYLE_NOTE = ("preview: done with voicing (whisper), vocal effort, pitch and formant scaling; speaking styles "
              "defined by wording or phrasing need Step-Audio-EditX")


def unavailable(options: tuple[str, ...], presets: dict) -> tuple[str, ...]:
    """The options in upstream order that have no preset."""
    return tuple(o for o in options if o not in presets)


def apply_prosody(params: WorldParams, prosody: Prosody) -> WorldParams:
    """Apply ``prosody`` (all but ``gain_db``, which belongs to the waveform) to WORLD parameters.

    Returns new parameters; the number of frames changes by ``1 / prosody.tempo``.
    """
    f0 = params.f0.copy()
    voiced = f0 > 0
    if voiced.any():
        log_f0 = np.log(f0[voiced])
        mean = log_f0.mean()
        spread = log_f0.std()
        scale = prosody.range_scale
        if prosody.target_log_std is not None and spread > 1e-6:
            scale = prosody.target_log_std / spread
        shifted = mean + (log_f0 - mean) * scale + prosody.semitones * np.log(2.0) / 12.0
        f0[voiced] = np.clip(np.exp(shifted), F0_FLOOR, F0_CEIL)
    sp, ap = params.sp, params.ap
    if prosody.formant != 1.0:
        sp = warp_envelope(sp, prosody.formant)
    if prosody.tilt_db_per_octave:
        freqs = np.linspace(0.0, params.sample_rate / 2.0, sp.shape[1])
        octaves = np.log2(np.maximum(freqs, 1000.0) / 1000.0)
        sp = sp * (10.0 ** (prosody.tilt_db_per_octave * octaves / 10.0))[None, :]
    if prosody.breathiness:
        ap = ap + (1.0 - ap) * prosody.breathiness
    if prosody.whisper:
        # Unvoiced everywhere: WORLD excites the envelope with noise only.
        f0 = np.zeros_like(f0)
        ap = np.ones_like(ap)
    out = params.replace(f0=f0, sp=sp, ap=ap)
    return time_stretch(out, prosody.tempo) if prosody.tempo != 1.0 else out


def time_stretch(params: WorldParams, tempo: float) -> WorldParams:
    """Change duration by ``1 / tempo`` without changing pitch, by resampling the frame sequence.

    Envelopes and aperiodicities are interpolated linearly between frames; F0 is interpolated
    where both neighbours are voiced and taken from the nearer frame otherwise, so voicing
    boundaries stay sharp.
    """
    frames = params.f0.shape[0]
    new_frames = max(2, int(round(frames / tempo)))
    position = np.linspace(0.0, frames - 1, new_frames)
    lo = np.floor(position).astype(np.int64)
    hi = np.minimum(lo + 1, frames - 1)
    w = (position - lo)[:, None]
    sp = params.sp[lo] * (1.0 - w) + params.sp[hi] * w
    ap = params.ap[lo] * (1.0 - w) + params.ap[hi] * w
    both = (params.f0[lo] > 0) & (params.f0[hi] > 0)
    nearest = np.where(w[:, 0] < 0.5, lo, hi)
    f0 = np.where(both, params.f0[lo] * (1.0 - w[:, 0]) + params.f0[hi] * w[:, 0], params.f0[nearest])
    return params.replace(f0=f0, sp=sp, ap=ap)


def humanise(params: WorldParams, seed: int, depth: float = 0.02) -> WorldParams:
    """Add a slow seeded pitch drift (log-F0 std ``depth``, about a third of a semitone).

    This is what makes two seeds two takes, as in the real engine; the same seed always gives
    the same output. Uses its own generator, never the global RNG.
    """
    rng = np.random.default_rng(seed)
    frames = params.f0.shape[0]
    # Smooth over ~150 ms so the drift sounds like intonation, not jitter.
    width = max(1, int(150.0 / params.frame_period_ms))
    noise = np.convolve(rng.standard_normal(frames + 2 * width), np.hanning(2 * width + 1), mode="same")
    noise = noise[width:width + frames]
    noise *= depth / max(float(noise.std()), 1e-9)
    f0 = np.where(params.f0 > 0, params.f0 * np.exp(noise), 0.0)
    return params.replace(f0=f0)


def set_level(samples: np.ndarray, level_db: float, peak: float = 0.98) -> np.ndarray:
    """Scale ``[N]`` so the RMS of its non-silent parts is ``level_db`` dBFS, never past ``peak``."""
    current = loudness_db(samples)
    if current <= -100.0:
        return samples.astype(np.float32)
    out = samples * np.float32(10.0 ** ((level_db - current) / 20.0))
    top = float(np.abs(out).max())
    if top > peak:
        out = out * np.float32(peak / top)
    return out.astype(np.float32)


def denoise(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    """Spectral gating (``noisereduce``) of ``[N]`` float32 at ``sample_rate``; same length out.

    The noise profile is taken from the quietest 15% of 1024-sample frames: in speech these are
    pauses, so the gate learns the noise rather than the voice (noisereduce's own estimate over
    the whole clip halves the speech energy of a talking-only clip). The mask is smoothed over
    100 Hz rather than the default 500 Hz so that it follows the harmonics of high voices.
    """
    import noisereduce

    y = np.asarray(samples, dtype=np.float32)
    frame = 1024
    count = len(y) // frame
    if count < 8:
        return y.copy()  # too short to tell noise from speech
    frames = y[:count * frame].reshape(count, frame)
    quietest = np.argsort(np.square(frames).mean(axis=1))[:max(4, int(0.15 * count))]
    out = noisereduce.reduce_noise(y=y, sr=sample_rate, y_noise=frames[np.sort(quietest)].reshape(-1),
                                   stationary=True, n_std_thresh_stationary=1.0, prop_decrease=1.0,
                                   freq_mask_smooth_hz=100, n_jobs=1)
    return np.asarray(out, dtype=np.float32)


def remove_silence(samples: np.ndarray, sample_rate: int, keep_gap_s: float = 0.15,
                   top_db: float = 35.0) -> np.ndarray:
    """Drop leading/trailing silence and shorten inner pauses to ``keep_gap_s``.

    Returns ``[M]`` float32, M <= N; short fades at each cut avoid clicks. An all-silent clip
    comes back unchanged.
    """
    spans = speech_intervals(samples, top_db=top_db)
    if len(spans) == 0:
        return np.asarray(samples, dtype=np.float32)
    gap = np.zeros(int(keep_gap_s * sample_rate), dtype=np.float32)
    fade = max(1, int(0.005 * sample_rate))
    pieces = []
    for index, (start, end) in enumerate(spans):
        piece = np.array(samples[start:end], dtype=np.float32)
        if len(piece) > 2 * fade:
            ramp = np.linspace(0.0, 1.0, fade, dtype=np.float32)
            piece[:fade] *= ramp
            piece[-fade:] *= ramp[::-1]
        if index:
            pieces.append(gap)
        pieces.append(piece)
    return np.concatenate(pieces)
