"""Render: the chosen takes joined into one loudness-normalised file, streamed to disk.

Owns: placing each take (after the previous one's pause, or at its SRT cue when that is later; a pause
of 0 overlaps the two with a short equal-power cross-fade), the short fades at every take's edges
(no clicks at a cut), measuring the whole render's integrated loudness (ITU-R BS.1770 / EBU R128 with
``pyloudnorm``) and applying one gain towards the target (lowered where the peak would pass -1 dBFS),
encoding WAV/FLAC/MP3/Opus block by block, and the ``Caption`` of every take (its first and last sample
in the render, and -- when the take's words were heard and timed -- the script's words placed in the
render: ``quality.timestamps.script_words`` shifted to the take's place).
Does not own: which take is chosen or where takes' audio comes from (the caller's ``load``), captions'
text formats (``productions.captions``).

Memory: takes are loaded one at a time; the joined float32 signal goes to a temporary file as it is
built; the loudness is measured reading that file block by block, and the encoder reads it back in
blocks. No copy of the whole production is ever held. (``pyloudnorm.Meter.integrated_loudness`` wants
the whole signal and makes several copies of it, so the measurement streams: it runs pyloudnorm's own
K-weighting filters block by block with their state carried over, sums each 100 ms hop, and applies the
BS.1770-4 gating of 400 ms blocks with 75 % overlap exactly as pyloudnorm does; a test checks the two
agree.)
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pyloudnorm
import soundfile as sf
from scipy import signal as scipy_signal

from core.audio_io import Audio, open_encoder, resample
from core.errors import InputError
from core.transcript import Word
from productions.model import Caption
from quality.timestamps import script_words

log = logging.getLogger(__name__)

RENDER_FORMATS = ("wav", "flac", "mp3", "opus")
EDGE_FADE_MS = 5.0          # at every take's start and end: a cut never clicks
PEAK_CEILING = 10 ** (-1.0 / 20)   # -1 dBFS (0.891): headroom for lossy encoders' overshoot
_BLOCK = 65536


@dataclass(frozen=True)
class RenderItem:
    """One segment to place: ``load()`` returns its chosen take's audio (called once, when placed)."""

    segment_id: str
    speaker: str
    text: str
    load: Callable[[], Audio]
    pause_ms: int = 0
    target_start_ms: int | None = None
    heard: tuple[Word, ...] = ()     # the take's timed words (from its start): word-level captions


@dataclass(frozen=True)
class RenderResult:
    """What a render wrote: the file, where each take lies, and the loudness it was brought to."""

    path: Path
    fmt: str
    sample_rate: int
    total_samples: int
    captions: tuple[Caption, ...]
    loudness_measured_lufs: float | None   # None: silent (no gated block)
    loudness_lufs: float | None            # after the gain
    gain_db: float
    peak: float                            # after the gain

    @property
    def duration_s(self) -> float:
        return self.total_samples / self.sample_rate


def _edge_fades(x: np.ndarray, rate: int) -> np.ndarray:
    n = min(int(rate * EDGE_FADE_MS / 1000), len(x) // 2)
    if n > 0:
        ramp = (np.arange(n, dtype=np.float32) + 0.5) / n
        x = x.copy()
        x[:n] *= ramp
        x[-n:] *= ramp[::-1]
    return x


def _placed_words(item: RenderItem, offset_s: float, duration_s: float) -> tuple[Word, ...]:
    """The segment's script words at their times in the render (inside the take's span)."""
    words = script_words(item.text, item.heard) if item.heard else ()

    def at(t: float) -> float:
        return offset_s + min(max(t, 0.0), duration_s)

    return tuple(Word(w.text, at(w.start_s), at(w.end_s)) for w in words)


def _join(items: Iterable[RenderItem], rate: int, crossfade_ms: float, raw: sf.SoundFile) -> tuple[list[Caption], int, float]:
    """Pass 1: write the joined takes to ``raw``; returns (captions, total samples, peak)."""
    fade = int(round(rate * crossfade_ms / 1000))
    pending = np.zeros(0, dtype=np.float32)   # the last samples written "in pencil": a cross-fade may overlap them
    written, peak = 0, 0.0
    captions: list[Caption] = []
    pause = 0
    for item in items:
        audio = item.load()
        x = audio.samples if audio.sample_rate == rate else resample(audio.samples, audio.sample_rate, rate)
        x = _edge_fades(np.asarray(x, dtype=np.float32), rate)
        prev_end = written + len(pending)
        start = prev_end + pause if captions else 0
        if item.target_start_ms is not None:
            start = max(start, int(round(item.target_start_ms * rate / 1000)))
        if start >= prev_end or not captions:
            buf = np.concatenate([pending, np.zeros(start - prev_end, np.float32), x])
        else:   # pause 0 and no cue target: overlap with an equal-power cross-fade
            n = min(prev_end - start, len(pending), len(x))
            start = prev_end - n
            t = (np.arange(n, dtype=np.float32) + 0.5) / max(n, 1)
            seam = pending[len(pending) - n:] * np.cos(t * np.pi / 2) + x[:n] * np.sin(t * np.pi / 2)
            buf = np.concatenate([pending[:len(pending) - n], seam, x[n:]])
        captions.append(Caption(item.segment_id, item.speaker, item.text, start, start + len(x), rate,
                                _placed_words(item, start / rate, len(x) / rate)))
        keep = min(fade, len(buf))
        head = buf[:len(buf) - keep]
        if len(head):
            raw.write(head)
            peak = max(peak, float(np.abs(head).max()))
        written += len(head)
        pending = buf[len(buf) - keep:]
        pause = 0 if item.pause_ms <= 0 else int(round(item.pause_ms * rate / 1000))
        if item.pause_ms <= 0:
            pause = -fade   # ask for the overlap
    if len(pending):
        raw.write(pending)
        peak = max(peak, float(np.abs(pending).max()))
        written += len(pending)
    return captions, written, peak


def render(items: list[RenderItem], out_path: Path, fmt: str, *, sample_rate: int, target_lufs: float,
           crossfade_ms: float = 20.0) -> RenderResult:
    """Join ``items`` in order and write ``out_path`` (``fmt``: wav, flac, mp3 or opus).

    Parameters:
        items: the segments with their chosen takes; at least one.
        sample_rate: of the render (takes at another rate are resampled).
        target_lufs: integrated loudness to aim at (EBU R128: -23; podcasts often -16).
        crossfade_ms: overlap where a segment's pause is 0.

    Raises:
        InputError: an unknown format or no items.
    """
    if fmt not in RENDER_FORMATS:
        raise InputError(f"unsupported render format {fmt!r}; choose one of {', '.join(RENDER_FORMATS)}")
    if not items:
        raise InputError("nothing to render: the production has no segments")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, raw_name = tempfile.mkstemp(suffix=".raw.wav", dir=out_path.parent)
    os.close(fd)
    try:
        with sf.SoundFile(raw_name, "w", samplerate=sample_rate, channels=1, format="WAV", subtype="FLOAT") as raw:
            captions, total, peak = _join(items, sample_rate, crossfade_ms, raw)
        measured = stream_loudness(raw_name, sample_rate)
        gain_db = 0.0 if measured is None else target_lufs - measured
        if peak > 0 and peak * 10 ** (gain_db / 20) > PEAK_CEILING:
            gain_db = 20 * math.log10(PEAK_CEILING / peak)
            log.info("render gain limited by the peak: %.1f dB instead of %.1f dB", gain_db, target_lufs - measured)
        gain = np.float32(10 ** (gain_db / 20))
        tmp_out = out_path.with_name(f"{out_path.name}.{os.getpid()}-{threading.get_ident()}.part")
        with sf.SoundFile(raw_name) as raw, open_encoder(tmp_out, fmt, sample_rate) as enc:
            for block in raw.blocks(blocksize=_BLOCK, dtype="float32"):
                enc.write(np.clip(block * gain, -1.0, 1.0))
        os.replace(tmp_out, out_path)
    finally:
        Path(raw_name).unlink(missing_ok=True)
    return RenderResult(out_path, fmt, sample_rate, total, tuple(captions), measured,
                        None if measured is None else measured + gain_db, gain_db, peak * float(gain))


def stream_loudness(path: str | Path, rate: int) -> float | None:
    """Integrated loudness (LUFS, ITU-R BS.1770-4) of a mono file, read block by block; None when it is
    shorter than one 400 ms block or nothing passes the gates (silence)."""
    meter = pyloudnorm.Meter(rate)   # pinned pyloudnorm: its K-weighting stages (shelf, high pass)
    stages = [(np.asarray(f.b, np.float64), np.asarray(f.a, np.float64), float(f.passband_gain))
              for f in meter._filters.values()]
    states = [np.zeros(max(len(b), len(a)) - 1) for b, a, _ in stages]
    block_s, step = meter.block_size, 1.0 - meter.overlap      # 0.4 s blocks, 0.1 s hops
    hop = int(round(block_s * step * rate))
    hop_sums: list[np.ndarray] = []
    leftover = np.zeros(0)
    total = 0
    with sf.SoundFile(str(path)) as f:
        for block in f.blocks(blocksize=_BLOCK, dtype="float64"):
            total += len(block)
            for k, (b, a, gain) in enumerate(stages):
                block, states[k] = scipy_signal.lfilter(b, a, block, zi=states[k])
                block = block * gain
            squares = np.concatenate([leftover, block * block])
            whole = len(squares) // hop * hop
            hop_sums.append(squares[:whole].reshape(-1, hop).sum(axis=1))
            leftover = squares[whole:]
    if total < block_s * rate:
        return None
    sums = np.concatenate([*hop_sums, [leftover.sum()]])
    per_block = int(round(1 / step))                           # 4 hops per block
    blocks = int(np.round((total / rate - block_s) / (block_s * step))) + 1
    window = np.convolve(sums, np.ones(per_block), mode="valid")[:blocks]
    z = window / (block_s * rate)
    with np.errstate(divide="ignore"):
        levels = -0.691 + 10 * np.log10(z)
    gated = z[levels >= -70.0]
    if not len(gated):
        return None
    relative = -0.691 + 10 * np.log10(gated.mean()) - 10.0
    gated = z[(levels > relative) & (levels > -70.0)]
    if not len(gated):
        return None
    value = -0.691 + 10 * np.log10(gated.mean())
    return float(value) if math.isfinite(value) else None
