"""A vLLM-ready view of a Step1 model folder, and the ``vllm serve`` command line for it.

Owns: ``write_vllm_view`` (a folder holding a rewritten ``config.json`` and relative links to every other
file of the model folder: weights, generation config, tokenizer), ``serve_args`` (the ``vllm serve``
arguments this project deploys with) and a CLI doing both.
Does not own: running vLLM, the sampling plugin (``llm.vllm_plugin``).

Why a view: vLLM 0.33 implements ``Step1ForCausalLM`` natively, but it reads the folder's config through
transformers, which does not know ``model_type: step1`` and would run the folder's own configuration code
(``--trust-remote-code``). The view states the same numbers in a configuration transformers knows
(``llama``; the ``architectures`` entry still selects vLLM's Step1 model), so no model-folder code runs.
It also fixes two facts vLLM would otherwise guess: ``num_key_value_heads`` = the Step1 attention groups,
and ``tie_word_embeddings`` = False whenever the checkpoint has its own ``lm_head.weight`` (vLLM ties when the
key is absent, which replaces the trained head by the embedding; golden README section 8). Quantisation
settings (e.g. the AWQ release's ``quantization_config``) are kept as they are.

    python -m llm.vllm_view models/Step-Audio-EditX models/Step-Audio-EditX-vllm --print-command
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Sequence

from core.errors import ModelError
from llm.vllm_plugin import PLUGIN_FQCN

SERVED_MODEL_NAME = "step-audio-editx"
MAX_MODEL_LEN = 8192          # prompt + answer, the reference's max_length
# vLLM's Step1 (use_alibi_sqrt) runs only on its Triton attention backend; the automatic choice on a GPU
# picks FlashAttention, which refuses it ("use_alibi_sqrt is not supported by backend ..."), so startup
# fails unless this is set. vLLM 0.33 takes it as --attention-backend / AsyncEngineArgs(attention_backend=).
ATTENTION_BACKEND = "TRITON_ATTN"
# "vllm": apply nothing from the folder's generation_config.json. The studio sends every sampling value
# per request, from the one rule both backends share (llm.native.GENERATION_FIELDS).
GENERATION_CONFIG = "vllm"


def checkpoint_keys(folder: Path) -> set[str]:
    """Tensor names of the folder's safetensors checkpoint (index file, else the files' headers)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    from safetensors import safe_open

    keys: set[str] = set()
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            keys |= set(handle.keys())
    return keys


def view_config(config: dict, has_lm_head: bool) -> dict:
    """``config`` (a Step1 ``config.json``) restated for vLLM without remote code."""
    try:
        heads, hidden = int(config["num_attention_heads"]), int(config["hidden_size"])
        groups = int(config.get("num_attention_groups") or config["num_key_value_heads"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"config.json lacks a Step1 field vLLM needs: {exc}") from None
    view = {k: v for k, v in config.items() if k != "auto_map"}
    view.update(model_type="llama", architectures=["Step1ForCausalLM"], num_attention_groups=groups,
                num_key_value_heads=groups, head_dim=hidden // heads, tie_word_embeddings=not has_lm_head,
                max_position_embeddings=max(int(config.get("max_seq_len") or 0),
                                            int(config.get("max_position_embeddings") or 0), MAX_MODEL_LEN))
    return view


def write_vllm_view(source: Path, target: Path) -> Path:
    """Write the view of ``source`` into ``target`` (created; an existing view there is refreshed).

    Raises:
        ModelError: ``source`` has no Step1 ``config.json`` or no safetensors weights.
    """
    source, target = Path(source).resolve(), Path(target)
    config_path = source / "config.json"
    if not config_path.is_file():
        raise ModelError(f"no LLM in {source}: config.json is missing")
    config = json.loads(config_path.read_text())
    if "Step1ForCausalLM" not in (config.get("architectures") or []):
        raise ModelError(f"{config_path} does not describe a Step1ForCausalLM")
    keys = checkpoint_keys(source)
    if not keys:
        raise ModelError(f"no safetensors weights in {source}")
    target.mkdir(parents=True, exist_ok=True)
    for entry in sorted(source.iterdir()):
        if entry.name == "config.json":
            continue
        link = target / entry.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(entry, target.resolve()))   # relative: valid wherever both are mounted
    (target / "config.json").write_text(json.dumps(view_config(config, "lm_head.weight" in keys), indent=1) + "\n")
    return target


def serve_args(folder: str | Path, *, host: str = "0.0.0.0", port: int = 8000, quantization: str | None = None,
               tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
               served_model_name: str = SERVED_MODEL_NAME) -> list[str]:
    """``vllm serve`` arguments for a view folder; the studio sends token ids, so vLLM needs no tokenizer."""
    args = ["vllm", "serve", str(folder), "--served-model-name", served_model_name, "--host", host,
            "--port", str(port), "--max-model-len", str(MAX_MODEL_LEN), "--skip-tokenizer-init",
            "--enable-prefix-caching", "--logits-processors", PLUGIN_FQCN,
            "--attention-backend", ATTENTION_BACKEND, "--generation-config", GENERATION_CONFIG,
            "--gpu-memory-utilization", f"{gpu_memory_utilization:g}",
            "--tensor-parallel-size", str(tensor_parallel_size)]
    if quantization:
        args += ["--quantization", quantization]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm.vllm_view", description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="the Step1 model folder (e.g. models/Step-Audio-EditX)")
    parser.add_argument("target", type=Path, help="where to write the view (e.g. models/Step-Audio-EditX-vllm)")
    parser.add_argument("--print-command", action="store_true", help="print the vllm serve command for the view")
    parser.add_argument("--quantization", default=None, help="e.g. awq, for the AWQ release")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        target = write_vllm_view(args.source, args.target)
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {target}")
    if args.print_command:
        print(shlex.join(serve_args(target, quantization=args.quantization,
                                    tensor_parallel_size=args.tensor_parallel_size)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
