"""Loading the Step-Audio-EditX LLM and its tokenizer from a local folder.

Owns: ``AutoModelForCausalLM``/``AutoTokenizer`` loading with ``local_files_only=True`` (never a
hub download), the end-of-answer ids and sampling defaults read from the folder, and turning
load failures into :class:`core.errors.ModelError`.
Does not own: generation (``llm.generation``).

``trust_remote_code``: the released checkpoint is a ``Step1ForCausalLM`` whose modelling code
ships inside the model folder, so transformers must run that code. The setting
(``--trust-remote-code``, default on) exists because it is the user's own local folder; turn it
off for architectures transformers knows natively. Known to work: transformers 4.57.6 (the
reference pins 4.53.3; 5.x breaks remote code written in this style).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.errors import ModelError
from llm.prompts import END_OF_TURN_ID

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedLLM:
    """A ready model + tokenizer and what generation needs to know about them."""

    model: Any                     # a transformers causal LM in eval mode, on ``device``
    tokenizer: Any                 # its tokenizer
    device: torch.device
    dtype: torch.dtype
    eos_id: int                    # the id to emit when forcing an answer to end
    eos_ids: tuple[int, ...]       # every id that ends an answer (model EOS ids + <|EOT|>)
    pad_id: int
    top_k: int = 50
    top_p: float = 1.0
    folder: Path = Path()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS or any other special token."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def _as_ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def load_llm(folder: Path, device: torch.device, dtype: torch.dtype, trust_remote_code: bool) -> LoadedLLM:
    """Load the LLM in ``folder`` onto ``device`` in ``dtype``.

    Raises:
        ModelError: the folder is missing, incomplete, needs remote code that is not allowed,
            or does not load.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ModelError(f"no LLM in {folder}: config.json is missing")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code,
                                                     dtype=dtype)
    except ValueError as exc:
        hint = "" if trust_remote_code else " (if the folder ships its own modelling code, enable --trust-remote-code)"
        raise ModelError(f"could not load the LLM from {folder}: {exc}{hint}") from None
    except Exception as exc:  # noqa: BLE001 - safetensors and tokenizers raise their own (or bare) types
        raise ModelError(f"could not load the LLM from {folder}: {exc}") from None
    model.to(device).eval()

    top_k, top_p, eos = 50, 1.0, _as_ids(tokenizer.eos_token_id)
    if (folder / "generation_config.json").is_file():
        try:
            gen = GenerationConfig.from_pretrained(folder, local_files_only=True)
            top_k = int(gen.top_k) if gen.top_k is not None else top_k
            top_p = float(gen.top_p) if gen.top_p is not None else top_p
            eos = _as_ids(gen.eos_token_id) or eos
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable %s: %s", folder / "generation_config.json", exc)
    eos = eos or _as_ids(getattr(model.config, "eos_token_id", None))
    # <|EOT|> closes the assistant turn: nothing after it belongs to the answer.
    eos_ids = tuple(dict.fromkeys([*eos, END_OF_TURN_ID]))
    pad = tokenizer.pad_token_id
    pad_id = int(pad) if pad is not None else eos_ids[0]
    llm = LoadedLLM(model=model, tokenizer=tokenizer, device=device, dtype=dtype, eos_id=eos_ids[0],
                    eos_ids=eos_ids, pad_id=pad_id, top_k=top_k, top_p=top_p, folder=folder)
    log.info("LLM %s loaded: %s, %.1f M parameters, %s %s, eos %s, top_k %d, top_p %g",
             folder.name, type(model).__name__, llm.parameters / 1e6, device, str(dtype).replace("torch.", ""),
             list(eos_ids), top_k, top_p)
    return llm
