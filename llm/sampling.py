"""Sampling rules for the Step-Audio-EditX LLM, and what is kept of its answer.

Owns: the reference's repetition-aware processor, the optional 2:3 slot mask, top-k/top-p, the
sampling configuration, and the output filter (audio ids only, vq02/vq06 slot pattern, whole
5-token groups).
Does not own: running the model or drawing the ids (``llm.native`` applies these rules per step,
one seeded ``torch.Generator`` per row, so a row's ids do not depend on what it is batched with),
the token layout and slot rule (``core.audio_tokens``).

Shapes: ``input_ids`` [B, L] int64 (left-padded), ``scores`` [B, V] float32 with V >= 70656.

Processor order per step, as the reference (transformers 4.53) applies it: repetition ban,
then (ours) slot mask, temperature, top-k, top-p, then one draw per row from that row's own
``torch.Generator``; the global RNG is never used.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch

from core.errors import ModelError
from core.audio_tokens import AUDIO_ID_END, AUDIO_ID_OFFSET, GROUP, fits_slot, slot_range

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingConfig:
    """How the LLM samples. Defaults are the reference's (transformers defaults for top-k/top-p)."""

    temperature: float = 0.7
    top_k: int = 50               # 0 disables
    top_p: float = 1.0            # 1.0 disables
    max_length: int = 8192        # prompt + answer
    max_new_tokens: int = 0       # extra cap per answer; 0: only max_length
    min_new_tokens: int = 0       # end-of-answer ids are banned before this many (benchmarks fix lengths)
    repetition_window: int = 10
    slot_mask: bool = True        # only sample ids that fit the 2:3 slot pattern (EOS always allowed)

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, not {self.temperature}")
        if (self.top_k < 0 or not 0 < self.top_p <= 1 or self.max_length < 2 or self.max_new_tokens < 0
                or self.min_new_tokens < 0):
            raise ValueError(f"bad sampling config: {self}")

    def budget(self, prompt_len: int) -> int:
        """How many ids an answer to a prompt of ``prompt_len`` ids may have."""
        room = self.max_length - prompt_len
        return min(room, self.max_new_tokens) if self.max_new_tokens else room


def repetition_ban(input_ids: torch.Tensor, scores: torch.Tensor, window: int = 10,
                   lengths: torch.Tensor | None = None) -> torch.Tensor:
    """The reference's ``RepetitionAwareLogitsProcessor``, row by row.

    A row whose last id occurs at least twice among its last ``window`` ids (itself included)
    gets that id banned (score -inf) for the next step. Rows with fewer than ``window`` real ids
    (``lengths``, default: all columns are real) are left alone. Modifies ``scores`` in place.
    """
    if input_ids.shape[1] < window:
        return scores
    tail = input_ids[:, -window:]
    last = tail[:, -1:]
    repeated = (tail == last).sum(dim=1) >= 2  # count/window > 0.1 with window 10
    if lengths is not None:
        repeated &= lengths >= window
    rows = torch.arange(scores.shape[0], device=scores.device)
    current = scores[rows, last[:, 0]]
    # Vectorised (no host sync): rows without a repeat keep their own score.
    scores[rows, last[:, 0]] = torch.where(repeated.to(scores.device), torch.full_like(current, float("-inf")),
                                           current)
    return scores


def slot_allowed(step: int, vocab: int, eos_ids: Sequence[int], device: torch.device) -> torch.Tensor:
    """Bool mask [V] of the ids allowed at answer position ``step`` (vq02 slots 0-1, vq06 slots 2-4)."""
    allowed = torch.zeros(vocab, dtype=torch.bool, device=device)
    lo, hi = slot_range(step)
    allowed[AUDIO_ID_OFFSET + lo:AUDIO_ID_OFFSET + hi] = True
    allowed[list(eos_ids)] = True
    return allowed


def top_k_top_p(scores: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Keep the ``top_k`` best scores (ties kept) and the smallest set reaching ``top_p`` mass."""
    if top_k and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= (1 - top_p)
        drop_sorted[..., -1:] = False
        scores = scores.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return scores


def top_candidates(scores: torch.Tensor, top_k: int, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The ids top-k/top-p keep and their probabilities, best first: (probs [B, k], ids [B, k]).

    Same rules as :func:`top_k_top_p` followed by a softmax, computed on the k best scores only
    (a tie at the k-th score keeps exactly k ids). Rows with every score -inf give NaN probs.
    """
    k = top_k if top_k and top_k < scores.shape[-1] else scores.shape[-1]
    values, ids = torch.topk(scores, k, dim=-1)            # descending
    if top_p < 1.0:
        values = top_k_top_p(values, 0, top_p)
    return values.float().softmax(dim=-1), ids


def answer_ids(generated: Sequence[int], eos_ids: Sequence[int]) -> list[int]:
    """The answer up to (not including) the first end-of-answer id."""
    stops = set(eos_ids)
    out = []
    for t in generated:
        if int(t) in stops:
            break
        out.append(int(t))
    return out


def filter_audio_ids(ids: Sequence[int]) -> tuple[list[int], int]:
    """Keep the ids that form whole ``[vq02, vq02, vq06, vq06, vq06]`` groups.

    Non-audio ids and audio ids of the wrong kind for the next slot are dropped; a trailing
    partial group is dropped (at most 96 ms). Returns (kept LLM ids, number dropped).
    """
    kept: list[int] = []
    for t in ids:
        t = int(t)
        if AUDIO_ID_OFFSET <= t < AUDIO_ID_END and fits_slot(len(kept), t - AUDIO_ID_OFFSET):
            kept.append(t)
    whole = len(kept) - len(kept) % GROUP
    return kept[:whole], len(ids) - whole


def audio_answer(generated: Sequence[int], eos_ids: Sequence[int]) -> list[int]:
    """The LLM audio ids (65536..70655) of one answer, filtered.

    Raises:
        ModelError: the answer holds no whole group of audio ids.
    """
    answer = answer_ids(generated, eos_ids)
    kept, dropped = filter_audio_ids(answer)
    if dropped:
        log.warning("LLM answer: dropped %d of %d ids that were not audio or broke the 2:3 slot pattern",
                    dropped, len(answer))
    if not kept:
        raise ModelError(f"the LLM answered without audio ({len(answer)} ids, none forming a whole "
                         "group of audio tokens); try another seed or check the model folder")
    return kept
