"""Tiny random-weight stand-ins for the real model folders, laid out like the release.

``build_tiny_model_root(tmp_path)`` gives a ``model_root`` with:

- ``Step-Audio-Tokenizer/``: a copy of the tokenizer fixture (tiny Paraformer + S3 ONNX + k-means).
- ``Step-Audio-EditX/``: a tiny **Step1** (``llm/step1.py``: sqrt-ALiBi, 6 heads in 2 groups, 2
  layers, hidden 48) written by ``llm.checkpoint.write_step1_checkpoint`` with the real id layout
  (vocabulary 70656: 65536 text ids, then ``<audio_N>`` at 65536 + N, vq02 N < 1024, vq06
  N = 1024 + code), plus a byte-level BPE ``tokenizer.json`` whose special tokens sit at the real
  ids (``<s>`` 1, ``</s>`` 2, ``<|EOT|>`` 3, ``<|BOT|>`` 4).
- ``Step-Audio-EditX/CosyVoice-300M-25Hz/``: the decoder fixture (yaml, flow, hift, campplus).

The LLM folder is built once per process (about a second) and copied into each root.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

from testkit.paths import FIXTURES

VOCAB = 70656           # 65536 text ids + 1024 vq02 + 4096 vq06 audio ids
AUDIO_OFFSET = 65536
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|EOT|>", "<|BOT|>", "<pad>"]   # ids 0..5
_CORPUS = [
    "system\nhuman\nassistant\n",
    "Generate audio with the following timbre, prosody and speaking style speaker name prompt text tokens",
    "As a highly skilled audio editing and tuning specialist, you excel in interpreting user instructions.",
    "Make the following audio more happy. The text corresponding to the audio is: Hello world.",
    "Remove any noise from the given audio while preserving the voice content clearly.",
    "The quick brown fox jumps over the lazy dog near the river bank. 你好，世界。今天天气很好！",
]
_built: dict[str, Path] = {}


def tiny_step1_config(hidden: int = 48, layers: int = 2, heads: int = 6, groups: int = 2, intermediate: int = 96,
                      vocab: int = VOCAB):
    """A small :class:`llm.step1.Step1Config` with the real special ids (bos 1, eos 3, pad 0)."""
    from llm.step1 import Step1Config

    return Step1Config(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads,
                       num_attention_groups=groups, num_hidden_layers=layers, vocab_size=vocab, max_seq_len=8192)


def build_tiny_tokenizer(folder: Path):
    """Save a tiny byte-level BPE tokenizer with the Step-Audio id layout into ``folder``; returns it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS, trainer)
    tok.add_tokens([f"<unused_{i}>" for i in range(AUDIO_OFFSET - tok.get_vocab_size())])
    tok.add_special_tokens([f"<audio_{i}>" for i in range(VOCAB - AUDIO_OFFSET)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.save_pretrained(folder)
    return fast


def build_tiny_llm(folder: Path, seed: int = 1234, **dims) -> Path:
    """Save a random tiny Step1 (``config.json`` + ``model.safetensors``) and the tokenizer into ``folder``.

    ``dims`` go to :func:`tiny_step1_config` (hidden, layers, heads, groups, intermediate).
    """
    from llm.checkpoint import write_step1_checkpoint

    folder.mkdir(parents=True, exist_ok=True)
    build_tiny_tokenizer(folder)
    write_step1_checkpoint(folder, tiny_step1_config(**dims), seed=seed)
    return folder


def _cached_llm() -> Path:
    if "llm" not in _built:
        root = Path(tempfile.mkdtemp(prefix="tiny-editx-"))
        atexit.register(shutil.rmtree, root, True)
        _built["llm"] = build_tiny_llm(root / "llm")
    return _built["llm"]


def build_tiny_model_root(tmp_path: Path) -> Path:
    """A complete ``model_root`` under ``tmp_path`` (see the module docstring); returns its path."""
    root = Path(tmp_path) / "models"
    shutil.copytree(FIXTURES / "tokenizer" / "Step-Audio-Tokenizer", root / "Step-Audio-Tokenizer")
    editx = root / "Step-Audio-EditX"
    shutil.copytree(_cached_llm(), editx)
    decoder = editx / "CosyVoice-300M-25Hz"
    decoder.mkdir()
    for name in ("cosyvoice.yaml", "flow.safetensors", "hift.safetensors", "campplus.onnx"):
        shutil.copy2(FIXTURES / "decoder" / name, decoder / name)
    return root
