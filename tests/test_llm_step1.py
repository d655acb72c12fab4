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
