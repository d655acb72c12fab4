"""Step1 weights on disk: strict loading of the shipped checkpoint, and writing test/benchmark folders.

Owns: ``load_step1`` (``config.json`` + ``model.safetensors`` or a sharded
``model.safetensors.index.json``, every key checked by name and shape, ``lm_head`` from the
checkpoint whenever it is there), ``random_state_dict`` and ``write_step1_checkpoint`` (a folder in
the shipped layout, e.g. a tiny model for tests or for a real vLLM run).
Does not own: the network (``llm/step1.py``), the tokenizer (``llm/text_tokenizer.py``).

Security: weights are read with safetensors only; nothing in the folder is executed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from core.errors import ModelError
from llm.step1 import Step1Config, Step1ForCausalLM

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
LM_HEAD = "lm_head.weight"
EMBED = "model.embed_tokens.weight"


def expected_shapes(config: Step1Config) -> dict[str, tuple[int, ...]]:
    """Every key of the shipped checkpoint and its shape (``lm_head.weight`` included)."""
    e, f, d = config.hidden_size, config.intermediate_size, config.head_dim
    h, g = config.num_attention_heads, config.num_attention_groups
    shapes = {EMBED: (config.vocab_size, e), "model.norm.weight": (e,), LM_HEAD: (config.vocab_size, e)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (e,), p + "post_attention_layernorm.weight": (e,),
            p + "self_attn.q_proj.weight": (h * d, e), p + "self_attn.k_proj.weight": (g * d, e),
            p + "self_attn.v_proj.weight": (g * d, e), p + "self_attn.o_proj.weight": (e, h * d),
            p + "mlp.gate_proj.weight": (f, e), p + "mlp.up_proj.weight": (f, e), p + "mlp.down_proj.weight": (e, f),
        })
    return shapes


def _weight_files(folder: Path) -> dict[str, Path]:
    """key -> file that holds it, from the index when sharded, else from the single file's header."""
    index, single = folder / INDEX, folder / WEIGHTS
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"{index}: not a safetensors index ({exc})") from None
        files = {}
        for key, name in weight_map.items():
            path = folder / str(name)
            if path.parent != folder:
                raise ModelError(f"{index}: key {key!r} points outside the folder ({name!r})")
            if not path.is_file():
                raise ModelError(f"{index}: shard {name} (holding {key!r}) is missing")
            files[key] = path
        return files
    if single.is_file():
        with _open(single, "cpu") as f:
            return {key: single for key in f.keys()}
    raise ModelError(f"no Step1 weights in {folder}: neither {WEIGHTS} nor {INDEX} is there")


def _open(path: Path, device: str):
    try:
        return safe_open(str(path), framework="pt", device=device)
    except (SafetensorError, OSError) as exc:
        raise ModelError(f"{path}: not a readable safetensors file ({exc})") from None


def read_state_dict(folder: Path, config: Step1Config, device: torch.device | str = "cpu",
                    dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint in ``folder``, checked against ``config``.

    Raises:
        ModelError: a shard is missing or unreadable, a key is missing, unexpected or has the wrong
            shape (the message names the file and the key). ``lm_head.weight`` may be absent.
    """
    folder = Path(folder)
    files = _weight_files(folder)
    shapes = expected_shapes(config)
    unexpected = sorted(set(files) - set(shapes))
    if unexpected:
        raise ModelError(f"{files[unexpected[0]]}: unexpected key {unexpected[0]!r} "
                         f"({len(unexpected)} unexpected in all) for this config.json")
    missing = sorted(set(shapes) - set(files) - {LM_HEAD})
    if missing:
        where = folder / INDEX if (folder / INDEX).is_file() else folder / WEIGHTS
        raise ModelError(f"{where}: missing key {missing[0]!r} ({len(missing)} missing in all)")
    by_file: dict[Path, list[str]] = {}
    for key, path in files.items():
        by_file.setdefault(path, []).append(key)
    state: dict[str, torch.Tensor] = {}
    for path, keys in by_file.items():
        with _open(path, str(device)) as f:
            present = set(f.keys())
            for key in keys:
                if key not in present:
                    raise ModelError(f"{path}: key {key!r} is listed in {INDEX} but not in this shard")
                shape = tuple(f.get_slice(key).get_shape())
                if shape != shapes[key]:
                    raise ModelError(f"{path}: key {key!r} has shape {list(shape)}, config.json implies "
                                     f"{list(shapes[key])}")
                tensor = f.get_tensor(key)
                state[key] = tensor.to(dtype) if dtype is not None else tensor
    return state


def load_step1(folder: Path | str, device: torch.device | str, dtype: torch.dtype) -> Step1ForCausalLM:
    """The Step1 model in ``folder`` on ``device`` in ``dtype`` (float32, bfloat16 or float16), in eval mode.

    ``lm_head.weight`` comes from the checkpoint whenever it is present, whatever the config says
    (transformers >= 4.54 silently replaced it by the embedding for this config; see the golden
    README section 8); the embedding is used only when the checkpoint has no ``lm_head.weight``.

    Raises:
        ModelError: ``config.json`` or the weights are missing or do not match (see
            :func:`read_state_dict`).
    """
    folder = Path(folder)
    config = Step1Config.from_json(folder / "config.json")
    device = torch.device(device)
    state = read_state_dict(folder, config, device, dtype)
    if LM_HEAD in state:
        same = torch.equal(state[LM_HEAD], state[EMBED])
        if config.tie_word_embeddings and not same:
            log.warning("%s says tie_word_embeddings, but its lm_head.weight differs from the embedding: "
                        "using the checkpoint's lm_head.weight", folder / "config.json")
        log.info("Step1 lm_head.weight taken from the checkpoint (%s the embedding)",
                 "equal to" if same else "differs from")
    else:
        state[LM_HEAD] = state[EMBED]
        log.info("Step1 checkpoint has no lm_head.weight: tied to the embedding")
    with torch.device("meta"):
        model = Step1ForCausalLM(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    log.info("Step1 loaded from %s: %d layers, hidden %d, %d heads / %d groups, vocab %d, %.1f M parameters, %s %s",
             folder, config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
             config.num_attention_groups, config.vocab_size, model.parameters_count / 1e6, device,
             str(dtype).replace("torch.", ""))
    return model


def random_state_dict(config: Step1Config, seed: int = 0, dtype: torch.dtype = torch.float32,
                      tied: bool = False) -> dict[str, torch.Tensor]:
    """Random weights for ``config`` from ``torch.Generator(seed)``: linear/embedding N(0, 0.02),
    norms 1 + 0.1 N(0, 1) (so a wrong norm shows), ``lm_head`` its own draw unless ``tied``."""
    g = torch.Generator().manual_seed(int(seed))
    state = {}
    for key, shape in expected_shapes(config).items():
        if key == LM_HEAD and tied:
            continue
        t = torch.randn(shape, generator=g)
        state[key] = (1.0 + 0.1 * t if key.endswith("norm.weight") else 0.02 * t).to(dtype)
    return state


def write_step1_checkpoint(folder: Path | str, config: Step1Config, state_dict: Mapping[str, torch.Tensor] | None = None,
                           seed: int = 0, shard_bytes: int | None = None) -> Path:
    """Write ``config.json`` and safetensors weights under the shipped key names into ``folder``.

    Parameters:
        state_dict: the tensors to write; None: :func:`random_state_dict` (config, seed).
        shard_bytes: split into ``model-0000i-of-0000n.safetensors`` files of at most about this
            size plus ``model.safetensors.index.json``; None: one ``model.safetensors``.

    Returns:
        ``folder``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = dict(random_state_dict(config, seed) if state_dict is None else state_dict)
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    (folder / "config.json").write_text(json.dumps(config.to_dict(), indent=1) + "\n", encoding="utf-8")
    if shard_bytes is None:
        save_file(state, str(folder / WEIGHTS), metadata={"format": "pt"})
        return folder
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state):
        nbytes = state[key].numel() * state[key].element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = state[key]
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
                                + "\n", encoding="utf-8")
    return folder
