"""llm.step1 + llm.checkpoint: golden parity with the reference Step1 and strict loading.

The expected values are the reference implementation's outputs on the tiny checkpoint in
tests/fixtures/llm (golden README section 8): logits and hidden states within 1e-4 (the reference's
own full-vs-incremental round-off is 2.4e-7), greedy ids exact. Bad folders are built here by
damaging a copy of that checkpoint, or written with ``write_step1_checkpoint``.
"""

import json
import logging
import shutil

import pytest
import torch
from conftest import FIXTURES
from safetensors.torch import load_file, save_file

from core.errors import ModelError
from llm.checkpoint import load_step1, random_state_dict, write_step1_checkpoint
from llm.step1 import Step1Config, alibi_slopes

LLM = FIXTURES / "llm"
GOLDEN = load_file(str(LLM / "golden_step1.safetensors"))
ATOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return load_step1(LLM, "cpu", torch.float32)


def _full(model, ids):
    """Logits [S,V] of one row run from an empty cache in one call."""
    cache = model.new_cache(1, 64)
    with torch.inference_mode():
        return model(ids[None], torch.arange(len(ids))[None], cache, torch.tensor([0]))[0]


def _greedy(model, prompts, steps=16, left_pad=False):
    """Greedy ids [B, steps] for a batch of prompts run together (padded to the longest)."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    pos = torch.full((len(prompts), width), -1, dtype=torch.long)
    for row, p in enumerate(prompts):
        cols = slice(width - len(p), width) if left_pad else slice(0, len(p))
        ids[row, cols], pos[row, cols] = p, torch.arange(len(p))
    cache, slots = model.new_cache(len(prompts), width + steps), torch.arange(len(prompts))
    lengths = torch.tensor([len(p) for p in prompts])
    out = []
    with torch.inference_mode():
        logits = model(ids, pos, cache, slots, logits_at=pos.argmax(dim=1))
        for step in range(steps):
            nxt = logits.argmax(dim=-1)
            out.append(nxt)
            if step + 1 < steps:
                logits = model(nxt[:, None], (lengths + step)[:, None], cache, slots, logits_at=torch.zeros_like(nxt))
    return torch.stack(out, dim=1)


def test_config_is_read_as_data():
    config = Step1Config.from_json(LLM / "config.json")
    assert (config.hidden_size, config.num_attention_heads, config.num_attention_groups) == (96, 6, 2)
    assert config.head_dim == 16 and config.eos_token_id == (3,) and config.tie_word_embeddings is None


def test_slopes_follow_the_reference_formula():
    # Worked by hand: 8 heads (a power of two) and 6 heads (4 + the odd powers of 2^(-4/4)).
    assert alibi_slopes(8) == pytest.approx([2 ** -k for k in range(1, 9)])
    assert alibi_slopes(6) == pytest.approx([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3])


@pytest.mark.parametrize("name", ["a", "b"])
def test_full_forward_logits_match_the_reference(model, name):
    torch.testing.assert_close(_full(model, GOLDEN[f"prompt_{name}"]), GOLDEN[f"logits_{name}"], atol=ATOL, rtol=0)


def test_hidden_states_match_the_reference(model):
    seen = {}
    hooks = [model.model.layers[0].register_forward_hook(lambda m, a, out: seen.__setitem__("layer0", out)),
             model.model.norm.register_forward_hook(lambda m, a, out: seen.__setitem__("norm", out))]
    try:
        _full(model, GOLDEN["prompt_a"])
    finally:
        for h in hooks:
            h.remove()
    torch.testing.assert_close(seen["layer0"][0], GOLDEN["hidden_a_after_layer0"], atol=ATOL, rtol=0)
    torch.testing.assert_close(seen["norm"][0], GOLDEN["final_norm_a"], atol=ATOL, rtol=0)


def test_incremental_decoding_matches_the_full_forward(model):
    ids = GOLDEN["prompt_a"]
    cache, slot = model.new_cache(1, 64), torch.tensor([0])
    with torch.inference_mode():
        parts = [model(ids[None, :31], torch.arange(31)[None], cache, slot)[0]]
        for p in range(31, 37):
            parts.append(model(ids[None, p:p + 1], torch.tensor([[p]]), cache, slot)[0])
    incremental = torch.cat(parts)
    torch.testing.assert_close(incremental, GOLDEN["logits_a_incremental"], atol=ATOL, rtol=0)
    torch.testing.assert_close(incremental, GOLDEN["logits_a"], atol=ATOL, rtol=0)


def test_greedy_ids_are_exact(model):
    assert _greedy(model, [GOLDEN["prompt_a"]])[0].tolist() == GOLDEN["greedy_a"].tolist()
    assert _greedy(model, [GOLDEN["prompt_b"]])[0].tolist() == GOLDEN["greedy_b"].tolist()


@pytest.mark.parametrize("left_pad", [True, False])
def test_a_padded_batch_gives_each_row_its_unbatched_answer(model, left_pad):
    out = _greedy(model, [GOLDEN["prompt_a"], GOLDEN["prompt_b"]], left_pad=left_pad)
    assert out[0].tolist() == GOLDEN["greedy_a"].tolist()
    assert out[1].tolist() == GOLDEN["greedy_b"].tolist()
    # The reference, which lets the padded row attend to its pads, got row 1 wrong.
    assert GOLDEN["reference_leftpad_batch_greedy"][1].tolist() != GOLDEN["greedy_b"].tolist()


def test_lm_head_comes_from_the_checkpoint_not_the_embedding(model):
    state = load_file(str(LLM / "model.safetensors"))
    assert not torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    assert torch.equal(model.lm_head.weight, state["lm_head.weight"])


def test_lm_head_is_tied_only_when_absent(tmp_path, caplog):
    folder = tmp_path / "tied"
    shutil.copytree(LLM, folder)
    state = load_file(str(LLM / "model.safetensors"))
    del state["lm_head.weight"]
    (folder / "model.safetensors").chmod(0o644)
    save_file(state, str(folder / "model.safetensors"))
    with caplog.at_level(logging.INFO, logger="llm.checkpoint"):
        tied = load_step1(folder, "cpu", torch.float32)
    assert torch.equal(tied.lm_head.weight, state["model.embed_tokens.weight"])
    assert "tied to the embedding" in caplog.text


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_loads_and_stays_close(model, dtype):
    half = load_step1(LLM, "cpu", dtype)
    assert half.lm_head.weight.dtype == dtype and half.model.layers[0].mlp.up_proj.weight.dtype == dtype
    logits = _full(half, GOLDEN["prompt_b"]).float()
    assert torch.isfinite(logits).all()
    assert (logits - GOLDEN["logits_b"]).abs().max() < 0.1   # bf16 has ~3 significant digits


def test_sharded_checkpoint_loads_like_the_single_file(tmp_path, model):
    state = load_file(str(LLM / "model.safetensors"))
    config = Step1Config.from_json(LLM / "config.json")
    folder = write_step1_checkpoint(tmp_path / "sharded", config, state, shard_bytes=200_000)
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 2 and not (folder / "model.safetensors").exists()
    sharded = load_step1(folder, "cpu", torch.float32)
    for key, value in model.state_dict().items():
        assert torch.equal(sharded.state_dict()[key], value), key


def _damaged(tmp_path, damage):
    config = Step1Config.from_json(LLM / "config.json")
    folder = write_step1_checkpoint(tmp_path / "bad", config, random_state_dict(config, seed=1), shard_bytes=300_000)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    if damage == "missing shard":
        shard = index["weight_map"]["model.layers.2.mlp.down_proj.weight"]
        (folder / shard).unlink()
        return folder, shard
    key = "model.layers.1.self_attn.k_proj.weight"
    shard = folder / index["weight_map"][key]
    tensors = load_file(str(shard))
    if damage == "missing key":
        del tensors[key]
        save_file(tensors, str(shard))
        del index["weight_map"][key]
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    elif damage == "unexpected key":
        tensors["model.layers.9.mlp.up_proj.weight"] = torch.zeros(2, 2)
        save_file(tensors, str(shard))
        index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = shard.name
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        key = "model.layers.9.mlp.up_proj.weight"
    elif damage == "wrong shape":
        tensors[key] = torch.zeros(16, 96)
        save_file(tensors, str(shard))
    elif damage == "truncated shard":
        shard.write_bytes(shard.read_bytes()[:1000])
        return folder, shard.name
    elif damage == "config without a field":
        data = json.loads((folder / "config.json").read_text())
        del data["num_attention_groups"]
        (folder / "config.json").write_text(json.dumps(data))
        return folder, "num_attention_groups"
    elif damage == "unknown model_type":
        data = json.loads((folder / "config.json").read_text())
        data["model_type"] = "llama"
        (folder / "config.json").write_text(json.dumps(data))
        return folder, "model_type"
    return folder, key


@pytest.mark.parametrize("damage", ["missing shard", "missing key", "unexpected key", "wrong shape", "truncated shard",
                                    "config without a field", "unknown model_type"])
def test_a_bad_folder_is_a_model_error_naming_file_and_key(tmp_path, damage):
    folder, names = _damaged(tmp_path, damage)
    with pytest.raises(ModelError) as info:
        load_step1(folder, "cpu", torch.float32)
    message = str(info.value)
    assert names in message and str(folder) in message


def test_write_step1_checkpoint_round_trips_config_and_weights(tmp_path):
    config = Step1Config(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_attention_groups=2,
                         num_hidden_layers=2, vocab_size=70, eos_token_id=(3, 2), tie_word_embeddings=False)
    folder = write_step1_checkpoint(tmp_path / "w", config, seed=5)
    assert Step1Config.from_json(folder / "config.json") == config
    loaded = load_step1(folder, "cpu", torch.float32)
    expected = random_state_dict(config, seed=5)
    assert set(expected) == set(loaded.state_dict())
    for key, value in expected.items():
        assert torch.equal(loaded.state_dict()[key], value), key


# ---------------------------------------------------------------- issue 25: attention without copies or syncs


def _reference_slopes(heads):
    """The reference's slope code restated (bloom/vLLM style): float32 bases raised to int32 powers."""
    import math

    n = 2 ** math.floor(math.log2(heads))
    slopes = torch.pow(torch.tensor(2 ** (-8 / n), dtype=torch.float32), torch.arange(1, n + 1, dtype=torch.int32))
    if n < heads:
        extra = torch.pow(torch.tensor(2 ** (-4 / n), dtype=torch.float32),
                          torch.arange(1, 2 * (heads - n), 2, dtype=torch.int32))
        slopes = torch.cat([slopes, extra])
    return slopes


@pytest.mark.parametrize("heads", [6, 48])
def test_slopes_are_the_references_float32_bits(heads):
    # Taken in float64 and rounded, 42 of the shipped model's 48 slopes were one float32 ulp off.
    assert torch.equal(torch.tensor(alibi_slopes(heads), dtype=torch.float32), _reference_slopes(heads))


@pytest.fixture()
def flex_model():
    import warnings

    warnings.filterwarnings("ignore", message=".*flex_attention.*")   # eager FlexAttention on CPU warns
    flex = load_step1(LLM, "cpu", torch.float32)
    flex.attention = "flex"
    return flex


@pytest.mark.parametrize("name", ["a", "b"])
def test_flex_attention_gives_the_references_logits(flex_model, name):
    # The CUDA prefill kernel's maths (score_mod bias, GQA, block mask), run eagerly on the CPU.
    torch.testing.assert_close(_full(flex_model, GOLDEN[f"prompt_{name}"]), GOLDEN[f"logits_{name}"], atol=ATOL,
                               rtol=0)


def test_flex_attention_padded_rows_equal_their_solo_runs(flex_model):
    out = _greedy(flex_model, [GOLDEN["prompt_a"], GOLDEN["prompt_b"]], steps=4, left_pad=True)
    assert out[0].tolist() == GOLDEN["greedy_a"][:4].tolist() and out[1].tolist() == GOLDEN["greedy_b"][:4].tolist()


@pytest.mark.parametrize("block_bytes", [1024, 7680])
def test_a_prefill_cut_into_query_blocks_gives_the_references_logits(model, monkeypatch, block_bytes):
    import llm.step1

    # 6 heads x 37 keys x 4 bytes per query: blocks of one query; of 8 queries (the last block holds 5).
    monkeypatch.setattr(llm.step1, "BIAS_BLOCK_BYTES", block_bytes)
    torch.testing.assert_close(_full(model, GOLDEN["prompt_a"]), GOLDEN["logits_a"], atol=ATOL, rtol=0)


def test_keys_read_beyond_the_last_position_change_nothing(model):
    ids = GOLDEN["prompt_b"]
    cache = model.new_cache(1, 64)
    with torch.inference_mode():
        wide = model(ids[None], torch.arange(len(ids))[None], cache, torch.tensor([0]), width=64)[0]
    torch.testing.assert_close(wide, GOLDEN["logits_b"], atol=ATOL, rtol=0)


def test_a_forward_with_its_width_never_waits_for_the_device_or_copies_per_head(model):
    """Ops that make the host wait for the device (``.item()``/``int()``, boolean-mask indexing) or copy keys per
    head would stall every decode step on a GPU; none may run once the caller passes ``width``."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(func.name())
            return func(*args, **(kwargs or {}))

    cache, slots = model.new_cache(2, 64), torch.tensor([1, 0])
    ids = torch.tensor([[5, 6, 7], [8, 9, 0]])
    pos = torch.tensor([[0, 1, 2], [0, 1, -1]])                  # row 1 padded
    with torch.inference_mode(), Ops() as ops:
        model(ids, pos, cache, slots, logits_at=torch.tensor([2, 1]), width=3)
        model(ids[:, :1], torch.tensor([[3], [2]]), cache, slots, logits_at=torch.tensor([0, 0]), width=4)
    forbidden = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::repeat_interleave",
                 "aten::item"}
    assert not ops.seen & forbidden, ops.seen & forbidden
    assert "aten::index_put_" in ops.seen                        # pads wrote somewhere: the scratch position


def test_pads_write_only_the_scratch_position(model):
    cache = model.new_cache(1, 8)
    with torch.inference_mode():
        model(torch.tensor([[0, 5, 6]]), torch.tensor([[-1, 0, 1]]), cache, torch.tensor([0]), width=2)
    keys = cache.keys[0][0]                                       # [M + 1, G, D]
    assert keys[:2].abs().sum() > 0 and keys[2:8].abs().sum() == 0 and keys[8].abs().sum() > 0


def test_auto_attention_falls_back_to_sdpa_when_flex_attention_fails(model, monkeypatch, caplog):
    import llm.step1

    def broken(device):                         # fault injection: a toolchain that cannot compile FlexAttention
        raise RuntimeError("no triton")

    monkeypatch.setattr(llm.step1, "_flex", broken)
    monkeypatch.setattr(model, "impl_for", lambda device, tokens: "sdpa" if model._flex_failed else "flex")
    try:
        with caplog.at_level("WARNING", logger="llm.step1"):
            logits = _full(model, GOLDEN["prompt_a"])
        torch.testing.assert_close(logits, GOLDEN["logits_a"], atol=ATOL, rtol=0)
        assert model._flex_failed and "FlexAttention failed" in caplog.text
    finally:
        model._flex_failed = False
