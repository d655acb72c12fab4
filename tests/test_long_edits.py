"""productions.long_edit: cutting long audio at pauses and dividing its transcript among the pieces.

Covers: every piece within the limit and the cuts inside pauses (silence at each cut), audio without a
pause still cut within the limit, a short clip left whole; a transcript divided in order at word,
CJK-character and tag boundaries by the pieces' speaking time, never an empty piece, and too few words
refused. (The HTTP edit of a long clip is in tests/test_productions_api.py.)
"""

from __future__ import annotations

import numpy as np
import pytest

from core.audio_io import Audio
from core.errors import InputError
from productions.long_edit import divide_text, split_points

RATE = 16000


def _speech(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * 140 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
            + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def _with_pauses(lengths: list[float], pause: float = 0.6) -> tuple[Audio, list[tuple[int, int]]]:
    parts, pauses, pos = [], [], 0
    for i, seconds in enumerate(lengths):
        parts.append(_speech(seconds, i))
        pos += len(parts[-1])
        parts.append(np.zeros(int(pause * RATE), np.float32))
        pauses.append((pos, pos + len(parts[-1])))
        pos += len(parts[-1])
    return Audio(np.concatenate(parts), RATE), pauses


def test_cuts_fall_in_pauses_and_pieces_fit():
    audio, pauses = _with_pauses([7, 5, 9, 6, 8, 4])
    ranges = split_points(audio, 12.0)
    assert ranges[0][0] == 0 and ranges[-1][1] == len(audio.samples)
    assert all(a == b for (_, a), (b, _) in zip(ranges, ranges[1:]))          # contiguous
    assert all(b - a <= 12 * RATE for a, b in ranges) and len(ranges) >= 4
    for _, cut in ranges[:-1]:
        assert any(lo < cut < hi for lo, hi in pauses), cut


def test_audio_without_pauses_is_still_cut_within_the_limit():
    audio = Audio(_speech(31.0, 3), RATE)
    ranges = split_points(audio, 10.0)
    assert all(b - a <= 10 * RATE for a, b in ranges) and ranges[-1][1] == len(audio.samples)


def test_a_short_clip_is_one_piece():
    assert split_points(Audio(_speech(3.0, 1), RATE), 10.0) == [(0, 3 * RATE)]


def test_the_transcript_is_divided_in_order_by_speaking_time():
    text = "One two three four five six seven eight nine ten eleven twelve."
    parts = divide_text(text, [1.0, 2.0, 1.0])
    assert " ".join(parts) == text and all(parts)
    assert len(parts[1].split()) > len(parts[0].split())
    cjk = divide_text("我们今天去公园[Laughter]玩吧，好不好？", [1.0, 1.0])
    assert "".join(cjk) == "我们今天去公园[Laughter]玩吧，好不好？" and all("[Laughter]" in p or "[" not in p for p in cjk)
    assert divide_text("a b", [5.0, 0.01]) == ["a", "b"]
    with pytest.raises(InputError, match="2 words for 3 pieces"):
        divide_text("only two", [1, 1, 1])
