"""The vLLM logits-processor plugin (``llm/vllm_plugin.py``) against the native sampling step.

vLLM itself cannot be installed here (no GPU build for this machine, and its torch/transformers pins differ
from ours), so the plugin's tensor core is driven with buffers laid out the way vLLM 0.33's Model Runner V2
hands them to a processor: per-slot committed ids ``all_token_ids[slot, :total_len]``, ``prompt_len`` and
``total_len`` per slot, and a row -> slot mapping that does not follow slot order. The expected values come
from the native functions in ``llm/sampling.py`` (``repetition_ban``, ``slot_allowed``, ``top_k_top_p``)
applied to each request's own id sequence.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from llm import vllm_plugin
from core.audio_tokens import AUDIO_ID_END, AUDIO_ID_OFFSET
from llm.sampling import repetition_ban, slot_allowed, top_k_top_p
from llm.vllm_plugin import MAX_WINDOW, StepAudioLogits, parse_xargs, request_xargs

VOCAB = AUDIO_ID_END + 64
EOS = (3, 70700)
VQ06 = AUDIO_ID_OFFSET + 1024


def _native(sequence: list[int], prompt_len: int, scores: torch.Tensor, window: int, slot_mask: bool) -> torch.Tensor:
    """One request's step through the native sampler's rules, before temperature."""
    ids = torch.tensor([sequence])
    out = repetition_ban(ids, scores.clone()[None], window, torch.tensor([len(sequence)]))[0] if window else scores.clone()
    if slot_mask:
        out = out.masked_fill(~slot_allowed(len(sequence) - prompt_len, VOCAB, EOS, out.device), float("-inf"))
    return out


def _requests(gen: torch.Generator) -> list[dict]:
    """Requests at different answer positions; several end on a repeated id (one of them an end id)."""
    requests = []
    for n, (prompt_len, answer_len) in enumerate([(12, 0), (15, 1), (9, 2), (20, 7), (11, 13), (30, 4), (14, 5), (4, 2)]):
        prompt = torch.randint(0, 65536, (prompt_len,), generator=gen).tolist()
        answer = [AUDIO_ID_OFFSET + int(t) for t in torch.randint(0, 5120, (answer_len,), generator=gen)]
        sequence = prompt + answer
        if n in (1, 3, 5, 7):        # last id repeated inside the window (n 7: fewer ids than the window)
            sequence[-4] = sequence[-1]
        if n == 4:                   # the repeated id is an end id
            sequence[-1] = sequence[-6] = EOS[1]
        if n == 6:                   # repeated, but outside a window of 10
            sequence[-12] = sequence[-1]
        requests.append({"sequence": sequence, "prompt_len": prompt_len})
    return requests


def _vllm_layout(requests: list[dict], slots: list[int], max_num_reqs: int = 12, max_len: int = 64):
    tokens = torch.full((max_num_reqs, max_len), -7, dtype=torch.int32)   # junk where nothing is committed
    prompt_len = torch.zeros(max_num_reqs, dtype=torch.int32)
    total_len = torch.zeros(max_num_reqs, dtype=torch.int32)
    for r, slot in zip(requests, slots):
        tokens[slot, :len(r["sequence"])] = torch.tensor(r["sequence"], dtype=torch.int32)
        prompt_len[slot], total_len[slot] = r["prompt_len"], len(r["sequence"])
    return tokens, prompt_len, total_len


@pytest.mark.parametrize("window, slot_mask", [(10, True), (10, False), (0, True), (3, True)])
def test_plugin_step_equals_the_native_sampling_step(window, slot_mask):
    gen = torch.Generator().manual_seed(5)
    requests = _requests(gen)
    slots = [9, 2, 7, 0, 11, 4, 5, 8]                    # slot order != row order
    tokens, prompt_len, total_len = _vllm_layout(requests, slots)
    core = StepAudioLogits(12, VOCAB, "cpu", tokens, prompt_len, total_len)
    for slot in slots:
        assert core.add_request(slot, request_xargs(window, slot_mask, EOS)) == (window > 0 or slot_mask)
    core.apply_staged_writes()

    order = [3, 0, 6, 7, 1, 5, 2, 4]                     # this step's rows
    scores = torch.randn(len(requests), VOCAB, generator=gen)
    logits = torch.stack([scores[i] for i in order])
    out = core.apply(logits.clone(), torch.tensor([slots[i] for i in order], dtype=torch.int32))

    for row, i in enumerate(order):
        r = requests[i]
        expected = _native(r["sequence"], r["prompt_len"], scores[i], window, slot_mask)
        assert torch.equal(out[row], expected), f"request {i}"
        # ... and so through temperature and top-k/top-p, as vLLM applies them next.
        assert torch.equal(top_k_top_p(out[row:row + 1] / 0.7, 50, 0.9), top_k_top_p(expected[None] / 0.7, 50, 0.9))
    # The cases really exercise both rules.
    if window == 10:
        assert sum(torch.isinf(out[row, requests[i]["sequence"][-1]]).item() for row, i in enumerate(order)) >= 3
    if slot_mask:
        assert torch.isinf(out[:, :AUDIO_ID_OFFSET]).sum() > 0 and torch.isfinite(out[:, EOS[0]]).any()


def test_rows_of_requests_without_the_arguments_and_recycled_slots_are_untouched():
    gen = torch.Generator().manual_seed(6)
    requests = _requests(gen)[:3]
    slots = [1, 2, 3]
    tokens, prompt_len, total_len = _vllm_layout(requests, slots, max_num_reqs=4)
    core = StepAudioLogits(4, VOCAB, "cpu", tokens, prompt_len, total_len)
    assert core.add_request(1, request_xargs(10, True, EOS))
    assert core.add_request(2, request_xargs(10, True, EOS))
    assert not core.add_request(2, {})                   # slot 2 recycled by a request that wants neither rule
    assert not core.add_request(3, None)
    core.apply_staged_writes()
    logits = torch.randn(3, VOCAB, generator=gen)
    out = core.apply(logits.clone(), torch.tensor(slots))
    assert torch.equal(out[1:], logits[1:])
    assert torch.equal(out[0], _native(requests[0]["sequence"], requests[0]["prompt_len"], logits[0], 10, True))


def test_a_vq06_slot_allows_only_vq06_ids_and_the_end_ids():
    prompt = [5] * 12
    sequence = prompt + [AUDIO_ID_OFFSET + 1, AUDIO_ID_OFFSET + 2]       # answer position 2: a vq06 slot
    tokens, prompt_len, total_len = _vllm_layout([{"sequence": sequence, "prompt_len": 12}], [0], max_num_reqs=1)
    core = StepAudioLogits(1, VOCAB, "cpu", tokens, prompt_len, total_len)
    core.add_request(0, request_xargs(10, True, EOS))
    core.apply_staged_writes()
    out = core.apply(torch.zeros(1, VOCAB), torch.tensor([0]))
    finite = torch.isfinite(out[0]).nonzero().flatten().tolist()
    assert finite == [EOS[0], *range(VQ06, AUDIO_ID_END), EOS[1]]


def test_request_arguments_are_validated():
    assert parse_xargs(request_xargs(10, True, EOS)) == (10, True, EOS)
    assert parse_xargs(None) is None and parse_xargs({"other": 1}) is None
    assert parse_xargs(request_xargs(0, False, EOS)) is None
    for bad in ({"step_audio_repetition_window": -1}, {"step_audio_repetition_window": MAX_WINDOW + 1},
                {"step_audio_repetition_window": "10"}, {"step_audio_slot_mask": 2},
                {"step_audio_slot_mask": 1},                                   # mask on but no end ids
                {"step_audio_slot_mask": 1, "step_audio_eos_ids": [1, 2, 3, 4, 5]},
                {"step_audio_slot_mask": 1, "step_audio_eos_ids": [-3]}):
        with pytest.raises(ValueError, match="step_audio_"):
            parse_xargs(bad)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_the_vllm_class_names_the_missing_dependency():
    with pytest.raises(ImportError, match="vLLM 0.33"):
        vllm_plugin.StepAudioLogitsProcessor
    with pytest.raises(AttributeError):
        vllm_plugin.NoSuchThing
