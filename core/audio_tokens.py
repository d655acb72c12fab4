"""The layout of Step-Audio's audio tokens, in one place: codebooks, groups, slots, ids, strings.

Owns: the two codebook sizes (vq02 1024 codes at 16.67 Hz, vq06 4096 codes at 25 Hz), the 120 ms
group of five *mixed* codes ``[vq02, vq02, vq06, vq06, vq06]`` (2:3), the interleave that builds
it, the mixed code space 0..5119 (vq02 as is, vq06 as 1024 + code), the LLM ids (65536 + mixed),
the ``<audio_N>`` string the LLM prompt carries, and the slot rule with its strict check.
Does not own: computing codes (``tokenizer/``), sampling or filtering an LLM answer
(``llm/sampling.py``, which applies :func:`slot_range`), the decoder's reshaping into 25 Hz
frames (``decoder/model.py``). Pure Python and numpy; importing it loads nothing heavy.

Layout (pipeline.md §1.4)::

    group g (120 ms):  mixed = [a, b, 1024 + c, 1024 + d, 1024 + e]
                       a, b = vq02[2g], vq02[2g+1]   c, d, e = vq06[3g], vq06[3g+1], vq06[3g+2]
    LLM id = 65536 + mixed          string = "<audio_{mixed}>" per code, no separators
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from core.errors import InputError

VQ02_CODES = 1024                          # vq02 codebook: mixed ids 0..1023
VQ06_CODES = 4096                          # vq06 codebook: mixed ids 1024..5119
MIXED_VOCAB = VQ02_CODES + VQ06_CODES      # 5120 mixed ids
AUDIO_ID_OFFSET = 65536                    # LLM id of <audio_0>
AUDIO_ID_END = AUDIO_ID_OFFSET + MIXED_VOCAB  # 70656, exclusive
VQ02_PER_GROUP, VQ06_PER_GROUP = 2, 3      # the 2:3 pattern
GROUP = VQ02_PER_GROUP + VQ06_PER_GROUP    # 5 mixed codes per 120 ms
VQ02_SLOTS = VQ02_PER_GROUP                # slots 0..1 of a group hold vq02, slots 2..4 vq06


def n_groups(vq02: Sequence[int], vq06: Sequence[int]) -> int:
    """Whole groups the two streams fill; codes beyond them are dropped by :func:`interleave`."""
    return min(len(vq02) // VQ02_PER_GROUP, len(vq06) // VQ06_PER_GROUP)


def interleave(vq02: Sequence[int], vq06: Sequence[int]) -> tuple[int, ...]:
    """Mixed codes ``[a, b, 1024+c, 1024+d, 1024+e]`` per group; excess codes are dropped."""
    out: list[int] = []
    for g in range(n_groups(vq02, vq06)):
        out += [int(c) for c in vq02[VQ02_PER_GROUP * g:VQ02_PER_GROUP * (g + 1)]]
        out += [VQ02_CODES + int(c) for c in vq06[VQ06_PER_GROUP * g:VQ06_PER_GROUP * (g + 1)]]
    return tuple(out)


def to_llm_ids(mixed: Sequence[int]) -> tuple[int, ...]:
    """LLM token ids of mixed codes (``65536 + N``)."""
    return tuple(AUDIO_ID_OFFSET + int(n) for n in mixed)


def from_llm_ids(ids: Sequence[int]) -> list[int]:
    """Mixed codes of LLM audio ids (``id - 65536``); the result is checked by whoever decodes it."""
    return [int(t) - AUDIO_ID_OFFSET for t in ids]


def audio_string(mixed: Sequence[int]) -> str:
    """``"<audio_N>..."`` for mixed codes N in 0..5119, no separators (the LLM prompt's audio tokens)."""
    return "".join(f"<audio_{int(n)}>" for n in mixed)


def is_vq02_slot(position: int) -> bool:
    """Whether position ``position`` of a mixed sequence (or an answer) holds a vq02 code."""
    return position % GROUP < VQ02_SLOTS


def slot_range(position: int) -> tuple[int, int]:
    """Mixed ids ``[lo, hi)`` allowed at ``position``: vq02 0..1023 in slots 0-1, vq06 1024..5119 in 2-4."""
    return (0, VQ02_CODES) if is_vq02_slot(position) else (VQ02_CODES, MIXED_VOCAB)


def fits_slot(position: int, mixed_id: int) -> bool:
    """Whether ``mixed_id`` is a valid code for ``position`` (the slot rule, one id at a time)."""
    lo, hi = slot_range(position)
    return lo <= int(mixed_id) < hi


def check_mixed(tokens, what: str = "tokens") -> list[int]:
    """The mixed ids as a list, after checking them (the reference checked none of this).

    Accepts a flat sequence, numpy array or torch tensor (``[L]`` or ``[1, L]``).

    Raises:
        InputError: empty, not integers, outside 0..5119 (LLM ids need - 65536), or an id of the
            wrong codebook for its slot; the message names the first offending position.
    """
    if hasattr(tokens, "detach"):   # a torch tensor, without importing torch here
        tokens = tokens.detach().cpu().numpy()
    array = np.asarray(tokens)
    if array.size == 0:
        raise InputError(f"{what} is empty: there is nothing to decode")
    if array.ndim == 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 1:
        raise InputError(f"{what} must be a flat sequence of ids, got shape {tuple(array.shape)}")
    if not np.issubdtype(array.dtype, np.integer):
        raise InputError(f"{what} must hold integer ids, got {array.dtype}")
    bad = np.flatnonzero((array < 0) | (array >= MIXED_VOCAB))
    if bad.size:
        i = int(bad[0])
        hint = f" (LLM audio ids start at {AUDIO_ID_OFFSET}; subtract it)" if array[i] >= AUDIO_ID_OFFSET else ""
        raise InputError(f"{what}[{i}] = {int(array[i])} is not an audio token id 0..{MIXED_VOCAB - 1}{hint}")
    slot = np.arange(array.size) % GROUP
    wrong = np.flatnonzero((slot < VQ02_SLOTS) != (array < VQ02_CODES))
    if wrong.size:
        i = int(wrong[0])
        kind = (f"a vq02 id (0..{VQ02_CODES - 1})" if slot[i] < VQ02_SLOTS
                else f"a vq06 id ({VQ02_CODES}..{MIXED_VOCAB - 1})")
        raise InputError(f"{what}[{i}] = {int(array[i])} is in slot {slot[i]} of its group of {GROUP}, which must "
                         f"hold {kind}; groups are [vq02, vq02, vq06, vq06, vq06]")
    return [int(x) for x in array]
