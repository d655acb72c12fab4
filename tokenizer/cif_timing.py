"""Token times from a Paraformer's CIF weights: when in the clip each recognised token is heard.

Owns: ``cif_token_spans``, which integrates the continuous-integrate-and-fire (CIF) weights of a
whole clip the way the model does when it decides how many tokens to emit, and gives each emitted
token the span of audio that carries it; and its frozen value type ``TokenSpan``.
Does not own: running the model or collecting the weights (``tokenizer.asr``), joining word pieces
into words (funasr's ``sentence_postprocess``), clamping to the audio (``quality.timestamps``).

How it is defined. The predictor gives every encoder frame (60 ms) a weight ``alpha``; integrating
them, a token is emitted ("fires") each time the running sum reaches ``threshold`` (1.0), and the
part of the firing frame's weight past the threshold starts the next token. So each token is made
of pieces of frames, each with a weight; within a frame the weight is spread evenly, which puts the
fire point at a fraction of the frame. A token's span runs from the start of its first piece to the
end of its last piece among those carrying at least ``min_weight`` of it -- the small weights a
silence contributes do not stretch a word across the pause. These are the model's own alignments;
nothing is interpolated from the text.

Units: frames in, seconds out (``frame_s`` per frame, frame ``k`` covering ``[k, k+1) * frame_s``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_WEIGHT = 0.05        # a frame piece giving a token under 5 % of its weight does not extend its span


@dataclass(frozen=True)
class TokenSpan:
    """Where one emitted token is heard, in seconds from the start of the clip."""

    start_s: float
    end_s: float


def cif_token_spans(alphas: np.ndarray, frames: np.ndarray, threshold: float, frame_s: float,
                    tail: float | None = None, min_weight: float = MIN_WEIGHT) -> list[TokenSpan]:
    """The span of every token the weights fire, in firing order.

    Parameters:
        alphas: ``[T]`` the predictor's weights of the frames it integrates, in order.
        frames: ``[T]`` each weight's frame number in the clip (may start below 0: padding frames).
        threshold: the predictor's firing threshold.
        frame_s: seconds per frame.
        tail: the weight the predictor appends after the last frame to flush a last partial
            token (``tail_threshold``); that token ends where the audio's last weighted piece does.
        min_weight: see the module docstring.
    Returns:
        One span per fire, the same count the model emits (it integrates in float32, as funasr does).
    """
    alphas = np.asarray(alphas, dtype=np.float32)
    frames = np.asarray(frames, dtype=np.int64)
    if alphas.shape != frames.shape or alphas.ndim != 1:
        raise ValueError("alphas and frames must be 1-D and of equal length")
    threshold32 = np.float32(threshold)
    # pieces[k]: (weight, start_s, end_s) of token k's parts, in time order.
    pieces: list[list[tuple[float, float, float]]] = [[]]
    integrate = np.float32(0.0)

    def add(weight: float, t0: float, t1: float) -> None:
        pieces[-1].append((weight, max(t0, 0.0), max(t1, 0.0)))

    for alpha, frame in zip(alphas, frames):
        t0, t1 = frame * frame_s, (frame + 1) * frame_s
        if alpha + integrate < threshold32:
            integrate = np.float32(integrate + alpha)
            if alpha > 0:
                add(float(alpha), t0, t1)
            continue
        need = threshold32 - integrate                 # what this frame gives the token it completes
        cut = t0 + (t1 - t0) * float(need / alpha)
        add(float(need), t0, cut)
        pieces.append([])
        integrate = np.float32(np.float32(integrate + alpha) - threshold32)
        if integrate > 0:
            add(float(integrate), cut, t1)
    fired = pieces[:-1]
    if tail is not None and np.float32(tail) + integrate >= threshold32:
        fired.append(pieces[-1])                       # the tail weight completes the last token
    clip_end = max(float(frames[-1] + 1) * frame_s, 0.0) if len(frames) else 0.0
    return [_span(p, min_weight, clip_end) for p in fired]


def _span(token_pieces: list[tuple[float, float, float]], min_weight: float, clip_end: float) -> TokenSpan:
    if not token_pieces:                               # fired by the tail alone: no audio carries it
        return TokenSpan(clip_end, clip_end)
    strong = [p for p in token_pieces if p[0] >= min_weight] or [max(token_pieces, key=lambda p: p[0])]
    return TokenSpan(strong[0][1], max(strong[-1][2], strong[0][1]))
