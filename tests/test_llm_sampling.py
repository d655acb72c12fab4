"""llm.sampling + llm.generation: repetition ban, slot mask, top-k/top-p, output filtering,
seeded and batched generation with a tiny random Llama.

Repetition cases come from tests/fixtures/prompts.json (run through the upstream processor);
top-k/top-p are checked against transformers' own warpers.
"""

import json

import pytest
import torch
from conftest import FIXTURES

from core.errors import ModelError
from llm.generation import GenerationRequest, generate_batch
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


# --------------------------------------------------------------------------- with a tiny LLM

@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # Tiny models gain nothing from intra-op threads, and on a busy 2-core runner they lose a lot.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from llm.loader import load_llm
    from testkit.tiny_models import build_tiny_llm

    folder = build_tiny_llm(tmp_path_factory.mktemp("llm"))
    return load_llm(folder, torch.device("cpu"), torch.float32, trust_remote_code=False)


def _prompt(llm, text):
    return tuple([1, 4] + llm.encode("system\n" + text) + [3, 4] + llm.encode("assistant\n"))


def test_loader_reads_eos_and_pad(llm):
    assert llm.eos_ids[:2] == (2, 3) and llm.eos_id == 2 and llm.pad_id == 5
    assert (llm.top_k, llm.top_p) == (50, 1.0)


@pytest.mark.parametrize("damage", ["truncated weights", "unknown tokenizer model"])
def test_a_corrupt_llm_folder_is_a_model_error(llm, tmp_path, damage):
    import json
    import shutil

    from core.errors import ModelError
    from llm.loader import load_llm

    folder = tmp_path / "llm"
    shutil.copytree(llm.folder, folder)
    if damage == "truncated weights":    # safetensors raises its own SafetensorError
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    else:                                # tokenizers raises a bare Exception
        (folder / "tokenizer.json").write_text(json.dumps({"model": {"type": "Nope"}}))
    with pytest.raises(ModelError, match="could not load the LLM"):
        load_llm(folder, torch.device("cpu"), torch.float32, trust_remote_code=False)


def test_seed_reproducibility_and_slot_pattern(llm):
    config = SamplingConfig(max_new_tokens=30)
    req = GenerationRequest(_prompt(llm, "speak"), seed=11)
    first = generate_batch(llm, [req], config)[0]
    again = generate_batch(llm, [req], config)[0]
    other = generate_batch(llm, [GenerationRequest(req.prompt_ids, seed=12)], config)[0]
    assert first.answer == again.answer
    assert first.answer != other.answer
    assert 0 < len(first.answer) <= 30
    # With the slot mask every id fits its slot, so filtering keeps all whole groups.
    kept, _ = filter_audio_ids(first.answer)
    assert kept == list(first.answer[:len(first.answer) // 5 * 5])
    assert first.batch_size == 1 and first.prefill_ms > 0 and first.decode_ms > 0


def test_sampling_does_not_touch_the_global_rng(llm):
    torch.manual_seed(0)
    before = torch.get_rng_state()
    generate_batch(llm, [GenerationRequest(_prompt(llm, "x"), seed=1)], SamplingConfig(max_new_tokens=5))
    assert torch.equal(before, torch.get_rng_state())


def test_batched_rows_equal_unbatched_rows(llm):
    config = SamplingConfig(max_new_tokens=25)
    requests = [GenerationRequest(_prompt(llm, text), seed) for text, seed in
                [("a", 1), ("a much longer system prompt text here", 2), ("mid length", 3)]]
    batched = generate_batch(llm, requests, config)
    alone = [generate_batch(llm, [r], config)[0] for r in requests]
    assert [b.answer for b in batched] == [a.answer for a in alone]
    assert {b.batch_size for b in batched} == {3} and len({b.batch_id for b in batched}) == 1


def test_per_row_budget_counts_each_rows_own_prompt(llm):
    short, long = _prompt(llm, "a"), _prompt(llm, "a much longer system prompt text here")
    config = SamplingConfig(max_length=len(long) + 10, slot_mask=True)
    out = generate_batch(llm, [GenerationRequest(short, 4), GenerationRequest(long, 5)], config)
    # Each answer fills max_length counted with its own prompt, not the padded width (the tiny
    # model emits no EOS for these seeds, so the budgets are what stops them).
    assert len(out[1].answer) == 10
    assert len(out[0].answer) == len(long) + 10 - len(short)


def test_min_new_tokens_holds_back_end_of_answer(llm):
    import dataclasses

    # Make every vq06 id an end-of-answer id: without the slot mask an answer then ends early.
    eager = dataclasses.replace(llm, eos_ids=(2, 3, *range(V6, A + 5120)))
    req = [GenerationRequest(_prompt(llm, "speak"), seed=21)]
    free = generate_batch(eager, req, SamplingConfig(max_new_tokens=30, slot_mask=False))[0]
    held = generate_batch(eager, req, SamplingConfig(max_new_tokens=30, min_new_tokens=20, slot_mask=False))[0]
    assert len(free.answer) < 20 <= len(held.answer)


def test_over_long_prompt_is_rejected(llm):
    with pytest.raises(ValueError, match="limit"):
        generate_batch(llm, [GenerationRequest(tuple(range(20)), 1)], SamplingConfig(max_length=20))
