"""core/audio_tokens.py: the audio-token layout shared by the tokenizer, the LLM code and the decoder.

Covers the 2:3 interleave (excess codes dropped), LLM ids and ``<audio_N>`` strings (expected
values written out by hand from pipeline.md §1.4), the slot rule, and the strict check's errors.
The golden parity of the layout on a real clip is in tests/test_tokenizer.py.
"""

import numpy as np
import pytest
import torch

from core import audio_tokens as at
from core.errors import InputError
from tokenizer.step_audio import Tokens


def test_interleave_groups_and_drops_excess():
    assert at.interleave((1, 2, 3, 4, 5), (10, 11, 12, 13, 14, 15, 16)) == \
        (1, 2, 1034, 1035, 1036, 3, 4, 1037, 1038, 1039)
    assert at.interleave((1, 2, 3, 4), (7, 8)) == ()
    assert at.n_groups((1, 2, 3, 4, 5), (10, 11, 12, 13, 14, 15, 16)) == 2


def test_tokens_use_the_layout():
    tokens = Tokens((0, 1023, 5), (4095, 0, 1, 2))
    assert tokens.n_groups == 1 and tokens.mixed == (0, 1023, 5119, 1024, 1025)
    assert tokens.llm_ids == (65536, 66559, 70655, 66560, 66561)
    assert tokens.audio_string == "<audio_0><audio_1023><audio_5119><audio_1024><audio_1025>"


@pytest.mark.parametrize("vq02, vq06", [((1024,), ()), ((-1,), ()), ((), (4096,))])
def test_tokens_reject_out_of_range_codes(vq02, vq06):
    with pytest.raises(ValueError, match="vq0"):
        Tokens(vq02, vq06)


def test_llm_ids_round_trip():
    mixed = [0, 1023, 1024, 5119]
    assert at.to_llm_ids(mixed) == (65536, 66559, 66560, 70655)
    assert at.from_llm_ids(at.to_llm_ids(mixed)) == mixed
    assert (at.AUDIO_ID_OFFSET, at.AUDIO_ID_END, at.MIXED_VOCAB) == (65536, 70656, 5120)


def test_slot_rule():
    assert [at.is_vq02_slot(i) for i in range(7)] == [True, True, False, False, False, True, True]
    assert at.slot_range(0) == (0, 1024) and at.slot_range(4) == (1024, 5120) and at.slot_range(5) == (0, 1024)
    assert at.fits_slot(1, 1023) and not at.fits_slot(1, 1024)
    assert at.fits_slot(2, 1024) and at.fits_slot(2, 5119) and not at.fits_slot(2, 5120) and not at.fits_slot(3, 7)


def test_check_accepts_lists_arrays_and_tensors():
    ids = [1, 2, 1030, 1031, 1032, 7]
    assert at.check_mixed(ids) == ids
    assert at.check_mixed(np.array(ids)) == ids
    assert at.check_mixed(torch.tensor([ids])) == ids   # [1, L], as a model's output


@pytest.mark.parametrize("tokens, message", [
    ([], "tokens is empty"),
    ([1, 2, 1030, 5120, 1500], r"tokens\[3\] = 5120 is not an audio token id"),
    ([1, -1], r"tokens\[1\] = -1 is not"),
    ([65537, 65538], "subtract it"),
    ([1, 2, 3, 1500, 1500], r"tokens\[2\] = 3 is in slot 2 .* vq06"),
    ([1, 2, 1030, 1031, 1032, 1200], r"tokens\[5\] = 1200 is in slot 0 .* vq02"),
    ([[1, 2], [3, 4]], "flat sequence"),
    ([0.5, 1.0], "integer ids"),
])
def test_bad_token_sequences_are_input_errors(tokens, message):
    with pytest.raises(InputError, match=message):
        at.check_mixed(np.array(tokens) if tokens and isinstance(tokens[0], float) else tokens)
