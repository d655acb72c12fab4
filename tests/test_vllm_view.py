"""The vLLM view of a Step1 folder (``llm/vllm_view.py``) on small folders written here with safetensors.

What vLLM then does with a view is checked on a GPU by ``bench/vllm_check.py``; here: the rewritten config
(what transformers will parse, what vLLM's Step1 model reads), the links, and the serve command.
"""

from __future__ import annotations

import json
import shlex

import pytest
import torch
from safetensors.torch import save_file

from core.errors import ModelError
from core.settings import load_settings
from llm.vllm_plugin import PLUGIN_FQCN
from llm.vllm_view import main, serve_args, write_vllm_view

CONFIG = {"model_type": "step1", "architectures": ["Step1ForCausalLM"], "auto_map": {"AutoConfig": "x.Step1Config"},
          "hidden_size": 96, "intermediate_size": 160, "num_attention_heads": 6, "num_attention_groups": 2,
          "num_hidden_layers": 3, "max_seq_len": 4096, "vocab_size": 512, "rms_norm_eps": 1e-5,
          "bos_token_id": 1, "eos_token_id": 3, "pad_token_id": 0}


def _folder(root, lm_head: bool):
    folder = root / "Step-Audio-EditX"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    (folder / "tokenizer.model").write_bytes(b"sentencepiece bytes")
    tensors = {"model.embed_tokens.weight": torch.zeros(512, 96)}
    if lm_head:
        tensors["lm_head.weight"] = torch.ones(512, 96)
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def test_view_restates_the_config_and_links_the_rest(tmp_path):
    source = _folder(tmp_path, lm_head=True)
    view = write_vllm_view(source, tmp_path / "view")
    config = json.loads((view / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["Step1ForCausalLM"]
    assert "auto_map" not in config                                   # nothing from the folder runs
    assert (config["num_key_value_heads"], config["num_attention_groups"], config["head_dim"]) == (2, 2, 16)
    assert config["tie_word_embeddings"] is False                      # the checkpoint's own lm_head is kept
    assert config["max_position_embeddings"] == 8192
    assert {k: config[k] for k in ("hidden_size", "vocab_size", "rms_norm_eps")} == {"hidden_size": 96,
                                                                                    "vocab_size": 512, "rms_norm_eps": 1e-5}
    assert (view / "model.safetensors").is_symlink() and not (view / "model.safetensors").readlink().is_absolute()
    assert (view / "tokenizer.model").read_bytes() == b"sentencepiece bytes"
    assert json.loads((source / "config.json").read_text()) == CONFIG  # the source is untouched


def test_without_an_lm_head_the_view_ties_it(tmp_path):
    view = write_vllm_view(_folder(tmp_path, lm_head=False), tmp_path / "view")
    assert json.loads((view / "config.json").read_text())["tie_word_embeddings"] is True


def test_bad_folders_are_refused(tmp_path, capsys):
    with pytest.raises(ModelError, match="config.json is missing"):
        write_vllm_view(tmp_path, tmp_path / "view")
    folder = _folder(tmp_path, lm_head=True)
    (folder / "config.json").write_text(json.dumps({**CONFIG, "architectures": ["GPT2LMHeadModel"]}))
    assert main([str(folder), str(tmp_path / "view")]) == 1
    assert "does not describe a Step1ForCausalLM" in capsys.readouterr().err


def test_serve_command_loads_the_plugin_and_matches_the_studio_limits(tmp_path, capsys):
    args = serve_args("/models/Step-Audio-EditX-vllm", quantization="awq", tensor_parallel_size=2)
    assert args[:3] == ["vllm", "serve", "/models/Step-Audio-EditX-vllm"]
    assert "--skip-tokenizer-init" in args and "--enable-prefix-caching" in args
    assert args[args.index("--logits-processors") + 1] == PLUGIN_FQCN
    assert args[args.index("--quantization") + 1] == "awq" and args[args.index("--tensor-parallel-size") + 1] == "2"
    assert int(args[args.index("--max-model-len") + 1]) == 8192
    # vLLM's Step1 (sqrt-ALiBi) starts only on the Triton attention backend; the folder's
    # generation_config.json is not applied by vLLM (the studio sends the one rule's values per request).
    assert args[args.index("--attention-backend") + 1] == "TRITON_ATTN"
    assert args[args.index("--generation-config") + 1] == "vllm"
    source = _folder(tmp_path, lm_head=True)
    assert main([str(source), str(tmp_path / "view"), "--print-command"]) == 0
    printed = capsys.readouterr().out.splitlines()[-1]
    assert shlex.split(printed) == serve_args(tmp_path / "view")
    assert load_settings(["--llm-backend", "vllm", "--llm-url", "http://vllm:8000"], env={}).llm_url == "http://vllm:8000"


def test_the_in_process_engine_gets_the_same_attention_backend_and_generation_rule(tmp_path, monkeypatch):
    """vLLM is not installed here: a stand-in ``vllm`` package records the engine arguments the backend
    builds (the boundary: what we hand vLLM), then refuses to load, as a missing GPU would."""
    import sys
    import types

    from llm.sampling import SamplingConfig
    from llm.vllm_backend import VLLMInProcessBackend

    seen = {}

    class AsyncEngineArgs:
        def __init__(self, **kwargs):
            seen.update(kwargs)

    class AsyncLLM:
        @staticmethod
        def from_engine_args(args):
            raise RuntimeError("no GPU here")

    fake = {"vllm": types.ModuleType("vllm"), "vllm.sampling_params": types.ModuleType("vllm.sampling_params"),
            "vllm.v1": types.ModuleType("vllm.v1"), "vllm.v1.engine": types.ModuleType("vllm.v1.engine"),
            "vllm.v1.engine.async_llm": types.ModuleType("vllm.v1.engine.async_llm")}
    fake["vllm"].AsyncEngineArgs, fake["vllm"].SamplingParams = AsyncEngineArgs, object
    fake["vllm.sampling_params"].RequestOutputKind = types.SimpleNamespace(DELTA="delta")
    fake["vllm.v1.engine.async_llm"].AsyncLLM = AsyncLLM
    for name, module in fake.items():
        monkeypatch.setitem(sys.modules, name, module)
    with pytest.raises(ModelError, match="no GPU here"):
        VLLMInProcessBackend(_folder(tmp_path, lm_head=True), list, (3,), SamplingConfig())
    assert seen["attention_backend"] == "TRITON_ATTN" and seen["generation_config"] == "vllm"
    assert seen["logits_processors"] == [PLUGIN_FQCN] and seen["skip_tokenizer_init"] is True
