"""Edits of audio longer than one model call takes: split at pauses, edit piece by piece, join.

Owns: finding the cut points (the middle of the longest pause in the second half of each window, else
the latest pause, so every piece is at most ``max_piece_s``; a window without a pause is cut at its
quietest 20 ms), each piece's
text (the transcript given, divided among the pieces by their share of speaking time at word or CJK
character boundaries; or the engine's ASR of the piece), editing the pieces in order (pass *i* of piece
*k* with seed ``seed + k``), joining them with ``llm.longform``'s equal-power cross-fade, and the
``LongEdit`` that says how the audio was split.
Does not own: the edit itself (``Engine.edit_iterations``), HTTP (``web.api``).

Dividing a given transcript by time is an estimate (speech rate varies); the result lists each piece's
text so a caller can check it, and the ASR path (no transcript) reads each piece itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from core.audio_io import Audio
from core.errors import InputError
from llm.longform import crossfade_join

FRAME_S = 0.02
MIN_PAUSE_S = 0.15
JOIN_FADE_MS = 30.0
_WORD = re.compile(r"\[[^\[\]\n]{1,40}\]\s*|[\u3400-\u9fff\uf900-\ufaff][\u3000-\u303f\uff00-\uffef]*\s*|\S+\s*")


@dataclass(frozen=True)
class Piece:
    """One piece of a long edit: samples ``[start, end)`` of the input, and the text it was edited with."""

    start: int
    end: int
    text: str


@dataclass(frozen=True)
class LongEdit:
    """The joined result, how it was split, and where each piece's text came from."""

    audio: Audio
    pieces: tuple[Piece, ...]
    sample_rate: int
    text_source: str          # "transcript" (divided by speaking time) or "asr"
    seed: int
    results: tuple = ()       # the last pass's Result of each piece (timings, seeds)

    def describe(self) -> dict:
        return {"pieces": [{"start_s": round(p.start / self.sample_rate, 3), "end_s": round(p.end / self.sample_rate, 3),
                            "text": p.text} for p in self.pieces],
                "text_source": self.text_source, "seed": self.seed}


def _frame_energy(samples: np.ndarray, rate: int) -> np.ndarray:
    hop = max(1, int(rate * FRAME_S))
    n = len(samples) // hop
    frames = samples[:n * hop].reshape(n, hop).astype(np.float64)
    return 10 * np.log10(np.mean(frames ** 2, axis=1) + 1e-10)


def split_points(audio: Audio, max_piece_s: float) -> list[tuple[int, int]]:
    """``[(start, end)]`` sample ranges covering ``audio``, each at most ``max_piece_s`` long, cut in pauses."""
    rate, total = audio.sample_rate, len(audio.samples)
    limit = int(max_piece_s * rate)
    if total <= limit:
        return [(0, total)]
    hop = max(1, int(rate * FRAME_S))
    energy = _frame_energy(audio.samples, rate)
    loud = np.percentile(energy, 95) if len(energy) else 0.0
    silent = energy < loud - 35.0            # 35 dB under the loud frames: a pause
    ranges, start = [], 0
    min_run = max(1, int(round(MIN_PAUSE_S / FRAME_S)))
    while total - start > limit:
        lo, mid, hi = (start + rate) // hop, (start + limit // 2) // hop, (start + limit) // hop
        runs = _silent_runs(silent, lo, hi, min_run)          # (first frame, end frame) of each pause
        late = [r for r in runs if (r[0] + r[1]) // 2 >= mid]
        if late:      # the longest pause in the window's second half: pieces stay long, cuts clean
            a, b = max(late, key=lambda r: r[1] - r[0])
        elif runs:    # else the latest pause
            a, b = runs[-1]
        else:         # no pause at all: the quietest frame of the second half
            a = b = mid + int(np.argmin(energy[mid:hi])) if hi > mid else hi
        cut = min(max(((a + b) // 2) * hop, start + hop), start + limit)
        ranges.append((start, cut))
        start = cut
    ranges.append((start, total))
    return ranges


def _silent_runs(silent: np.ndarray, lo: int, hi: int, min_run: int) -> list[tuple[int, int]]:
    runs, i = [], lo
    hi = min(hi, len(silent))
    while i < hi:
        if silent[i]:
            j = i
            while j < hi and silent[j]:
                j += 1
            if j - i >= min_run:
                runs.append((i, j))
            i = j
        else:
            i += 1
    return runs


def divide_text(text: str, weights: list[float]) -> list[str]:
    """``text`` cut at word (or CJK character, or tag) boundaries into ``len(weights)`` parts whose lengths
    follow ``weights``; no part is empty while words remain."""
    words = _WORD.findall(text.strip())
    if len(words) < len(weights):
        raise InputError(f"the transcript has {len(words)} words for {len(weights)} pieces of audio; give a fuller "
                         "transcript, or leave it out to transcribe each piece")
    sizes = np.array([len(w.strip()) or 1 for w in words], dtype=float)
    cum = np.cumsum(sizes) / sizes.sum()
    bounds = np.cumsum(weights)[:-1] / sum(weights)
    cuts, prev = [], 0
    for k, b in enumerate(bounds):
        idx = int(np.searchsorted(cum, b)) + 1
        idx = max(idx, prev + 1)                                   # every piece gets a word
        idx = min(idx, len(words) - (len(weights) - 1 - k))        # ... and leaves one for each after it
        cuts.append(idx)
        prev = idx
    edges = [0, *cuts, len(words)]
    return ["".join(words[a:b]).strip() for a, b in zip(edges, edges[1:])]


def _speech_seconds(audio: Audio, start: int, end: int) -> float:
    energy = _frame_energy(audio.samples[start:end], audio.sample_rate)
    if not len(energy):
        return (end - start) / audio.sample_rate
    loud = np.percentile(energy, 95)
    return max(float(np.sum(energy >= loud - 35.0)) * FRAME_S, FRAME_S)


def long_edit(engine, audio: Audio, audio_text: str | None, edit_type: str, edit_info: str | None, *,
              max_piece_s: float, iterations: int = 1, seed: int = 0, options=None, call=None) -> LongEdit:
    """Edit ``audio`` of any length (within the caller's limit) piece by piece.

    Parameters:
        engine: the engine (``edit_iterations``, ``transcribe``).
        audio_text: what the whole clip says; None or empty: each piece is transcribed.
        max_piece_s: the longest piece (what one model call takes).
        call: ``call(endpoint, fn)`` around each engine call (timing, metrics); direct when None.

    Raises:
        InputError: a paralinguistic edit (its new text cannot be divided among pieces), a transcript with
            fewer words than pieces, or what the engine raises.
    """
    if edit_type == "paralinguistic":
        raise InputError("paralinguistic edits take a new text for the whole clip and cannot be split; edit at "
                         f"most {max_piece_s:g} s at a time")
    call = call or (lambda endpoint, fn: fn())
    ranges = split_points(audio, max_piece_s)
    pieces_audio = [Audio(audio.samples[a:b], audio.sample_rate) for a, b in ranges]
    if audio_text and audio_text.strip():
        texts = divide_text(audio_text, [_speech_seconds(audio, a, b) for a, b in ranges])
        source = "transcript"
    else:
        texts = [call("transcribe", lambda p=p: engine.transcribe(p)).text for p in pieces_audio]
        source = "asr"
    extra = {} if options is None else {"options": options}
    results, outputs = [], []
    for k, (piece, text) in enumerate(zip(pieces_audio, texts)):
        passes = call(f"edit_{edit_type}", lambda piece=piece, text=text, k=k: engine.edit_iterations(
            piece, text, edit_type, edit_info, None, iterations=iterations, seed=(seed + k) % 2**31, **extra))
        results.append(passes[-1])
        outputs.append(passes[-1].audio.samples)
    rate = results[0].audio.sample_rate
    joined = crossfade_join(outputs, rate, JOIN_FADE_MS)
    return LongEdit(Audio(joined, rate), tuple(Piece(a, b, t) for (a, b), t in zip(ranges, texts)), audio.sample_rate,
                    source, seed, tuple(results))
