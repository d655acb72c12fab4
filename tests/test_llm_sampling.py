"""llm.sampling (+ the native decode loop that applies it): repetition ban, slot mask, top-k/top-p,
output filtering, and seeded, batched sampling with a tiny random Step1 in the real id layout.

Repetition cases come from tests/fixtures/prompts.json (run through the upstream processor);
top-k/top-p are checked against transformers' own warpers.
"""

import json

import pytest
import torch
from conftest import FIXTURES

from core.errors import ModelError
from llm.backend import GenerationRequest
from llm.sampling import (SamplingConfig, audio_answer, filter_audio_ids, repetition_ban, slot_allowed,
                          top_candidates, top_k_top_p)

SPEC = json.loads((FIXTURES / "prompts.json").read_text(encoding="utf-8"))
A = 65536            # <audio_0>
V6 = A + 1024        # first vq06 id


@pytest.mark.parametrize("case", SPEC["repetition_processor_cases"])
def test_repetition_cases_match_reference(case):
    ids = torch.tensor([case["input_ids"]])
    scores = repetition_ban(ids, torch.zeros(1, case["vocab"]))
    banned = torch.isinf(scores[0]).nonzero().flatten().tolist()
    assert banned == case["banned_ids"]


def test_repetition_is_per_row_and_respects_real_length():
    ids = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 0, 9, 9],     # 9 twice in the window: banned
                        [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],    # no repeat
                        [5, 5, 5, 5, 5, 5, 5, 5, 5, 5]])    # repeat, but only 6 real ids (left padding)
    scores = repetition_ban(ids, torch.zeros(3, 16), lengths=torch.tensor([10, 10, 6]))
    assert torch.isinf(scores).nonzero().tolist() == [[0, 9]]


def test_slot_mask_follows_the_2_3_pattern():
    for step in range(10):
        allowed = slot_allowed(step, 70700, eos_ids=(2, 3), device=torch.device("cpu"))
        assert allowed[2] and allowed[3] and not allowed[4] and not allowed[70656]
        vq02 = step % 5 < 2
        assert bool(allowed[A]) == vq02 and bool(allowed[A + 1023]) == vq02
        assert bool(allowed[V6]) != vq02 and bool(allowed[A + 5119]) != vq02
        assert int(allowed.sum()) == 2 + (1024 if vq02 else 4096)


@pytest.mark.parametrize("top_k,top_p", [(50, 1.0), (5, 0.8), (0, 0.3), (70000, 1.0)])
def test_top_k_top_p_matches_transformers(top_k, top_p):
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    scores = torch.randn(3, 1000, generator=torch.Generator().manual_seed(7)) * 3
    expected = scores.clone()
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1.0:
        expected = TopPLogitsWarper(top_p)(None, expected)
    assert torch.equal(torch.isinf(top_k_top_p(scores.clone(), top_k, top_p)), torch.isinf(expected))
    # The sampler's compact form keeps the same ids with the same probabilities.
    probs, ids = top_candidates(scores.clone(), top_k, top_p)
    full = expected.softmax(dim=-1)
    for row in range(3):
        kept = probs[row] > 0
        assert set(ids[row][kept].tolist()) == set(torch.isfinite(expected[row]).nonzero().flatten().tolist())
        torch.testing.assert_close(probs[row][kept], full[row, ids[row][kept]])


def test_filter_drops_non_audio_and_wrong_slots():
    # a text id, a vq06 where a vq02 is due and a vq02 where a vq06 is due (dropped), a beyond-audio
    # id, then a partial trailing group (dropped).
    ids = [42, A + 1, V6 + 99, A + 2, V6 + 7, V6 + 8, A + 9, V6 + 9, A + 3, 70700, A + 4, V6]
    kept, dropped = filter_audio_ids(ids)
    assert kept == [A + 1, A + 2, V6 + 7, V6 + 8, V6 + 9]
    assert dropped == len(ids) - 5


def test_audio_answer_stops_at_eos_and_rejects_no_audio():
    group = [A + 1, A + 2, V6 + 3, V6 + 4, V6 + 5]
    assert audio_answer(group + [2] + group, eos_ids=(2, 3)) == group
    with pytest.raises(ModelError, match="without audio"):
        audio_answer([10, 11, 12, 3] + group, eos_ids=(2, 3))
    with pytest.raises(ModelError):
        audio_answer([A + 1, A + 2, V6 + 3], eos_ids=(2,))   # no whole group


def test_sampling_config_budget():
    assert SamplingConfig().budget(1000) == 7192
    assert SamplingConfig(max_new_tokens=40).budget(1000) == 40
    assert SamplingConfig(max_new_tokens=40).budget(8180) == 12
    with pytest.raises(ValueError):
        SamplingConfig(temperature=0)


# --------------------------------------------------------------------------- with a tiny Step1

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from testkit.tiny_models import build_tiny_llm

    return build_tiny_llm(tmp_path_factory.mktemp("llm"))


@pytest.fixture(scope="module")
def llm(folder):
    from llm.native import NativeBackend

    backend = NativeBackend.from_folder(folder, torch.device("cpu"), torch.float32)
    yield backend
    backend.close()


def generate(llm, requests, config, **kw):
    """Answers for ``requests`` run together (queued before the worker starts) on a fresh backend."""
    from llm.native import NativeBackend

    backend = NativeBackend(llm.model, llm.tokenizer, config, llm.eos_ids, start=False, **kw)
    try:
        streams = [backend.submit(r) for r in requests]
        backend.start()
        return [s.result(120) for s in streams]
    finally:
        backend.close()


def _prompt(llm, text):
    return tuple([1, 4] + llm.encode("system\n" + text) + [3, 4] + llm.encode("assistant\n"))


def test_folder_settings_eos_and_sampling_defaults(llm):
    # config.json says eos 3, and only that ends an answer: the reference's generate() never stops at the
    # tokenizer's own </s> (2).
    assert llm.tokenizer.eos_id == 2 and llm.eos_ids == (3,)
    assert (llm.sampling.top_k, llm.sampling.top_p, llm.sampling.temperature) == (50, 1.0, 0.7)


def test_generation_config_is_read_as_data(folder, tmp_path, caplog):
    import json
    import logging
    import shutil

    from llm.native import NativeBackend

    copy = tmp_path / "llm"
    shutil.copytree(folder, copy)
    (copy / "generation_config.json").write_text(json.dumps({"top_k": 7, "top_p": 0.9, "eos_token_id": [5],
                                                             "temperature": 1.3, "repetition_penalty": 1.2}))
    with caplog.at_level(logging.WARNING, logger="llm.native"):
        backend = NativeBackend.from_folder(copy, torch.device("cpu"), torch.float32, max_new_tokens=9,
                                            slot_mask=False)
    try:
        assert (backend.sampling.top_k, backend.sampling.top_p) == (7, 0.9)
        assert backend.eos_ids == (5,)                       # the file's end ids replace config.json's
        # One rule (llm.native.GENERATION_FIELDS): temperature stays the reference's explicit 0.7, and a
        # field the sampler does not apply is named in a warning instead of silently meaning something.
        assert backend.sampling.temperature == 0.7
        assert "repetition_penalty" in caplog.text and "temperature" not in caplog.text
        assert backend.sampling.max_new_tokens == 9 and not backend.sampling.slot_mask
    finally:
        backend.close()


def test_seed_reproducibility_and_slot_pattern(llm):
    config = SamplingConfig(max_new_tokens=30)
    req = GenerationRequest(_prompt(llm, "speak"), seed=11)
    first, again, other = generate(llm, [req], config)[0], generate(llm, [req], config)[0], \
        generate(llm, [GenerationRequest(req.prompt_ids, seed=12)], config)[0]
    assert first.answer == again.answer
    assert first.answer != other.answer
    assert 0 < len(first.answer) <= 30
    # With the slot mask every id fits its slot, so filtering keeps all whole groups.
    kept, _ = filter_audio_ids(first.answer)
    assert kept == list(first.answer[:len(first.answer) // 5 * 5])
    assert first.batch_size == 1 and first.prefill_ms > 0 and first.decode_ms >= 0


def test_sampling_does_not_touch_the_global_rng(llm):
    torch.manual_seed(0)
    before = torch.get_rng_state()
    generate(llm, [GenerationRequest(_prompt(llm, "x"), seed=1)], SamplingConfig(max_new_tokens=5))
    assert torch.equal(before, torch.get_rng_state())


def test_batched_rows_equal_unbatched_rows(llm):
    config = SamplingConfig(max_new_tokens=25)
    requests = [GenerationRequest(_prompt(llm, text), seed) for text, seed in
                [("a", 1), ("a much longer system prompt text here", 2), ("mid length", 3)]]
    batched = generate(llm, requests, config)
    alone = [generate(llm, [r], config)[0] for r in requests]
    assert [b.answer for b in batched] == [a.answer for a in alone]
    assert max(b.batch_size for b in batched) == 3


def test_per_row_budget_counts_each_rows_own_prompt(llm):
    short, long = _prompt(llm, "a"), _prompt(llm, "a much longer system prompt text here")
    config = SamplingConfig(max_length=len(long) + 10, min_new_tokens=10**6)   # no EOS: budgets stop them
    out = generate(llm, [GenerationRequest(short, 4), GenerationRequest(long, 5)], config)
    assert len(out[1].answer) == 10
    assert len(out[0].answer) == len(long) + 10 - len(short)


def test_a_request_budget_caps_the_answer(llm):
    config = SamplingConfig(min_new_tokens=10**6)
    out = generate(llm, [GenerationRequest(_prompt(llm, "x"), 1, max_new_tokens=7)], config)[0]
    assert len(out.answer) == 7


def test_min_new_tokens_holds_back_end_of_answer(llm):
    # Make half the vocabulary end-of-answer ids: without the slot mask an answer then ends at once.
    eager = type("Eager", (), {"model": llm.model, "tokenizer": llm.tokenizer,
                               "eos_ids": (3, 2, *range(A // 2, A + 5120))})
    req = [GenerationRequest(_prompt(llm, "speak"), seed=21)]
    free = generate(eager, req, SamplingConfig(max_new_tokens=30, slot_mask=False))[0]
    held = generate(eager, req, SamplingConfig(max_new_tokens=30, min_new_tokens=20, slot_mask=False))[0]
    assert len(free.answer) < 20 <= len(held.answer)


def test_over_long_prompt_is_rejected(llm):
    from core.errors import InputError

    with pytest.raises(InputError, match="limit is 20"):
        generate(llm, [GenerationRequest(tuple(range(20)), 1)], SamplingConfig(max_length=20))
