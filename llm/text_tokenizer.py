"""The LLM's text tokenizer, loaded from the model folder's files as data.

Owns: finding and loading the tokenizer files of ``Step-Audio-EditX/`` without running any code
from the folder, and ``TextTokenizer.encode`` (text -> ids, never BOS or other added specials).
Does not own: prompt layout (``llm/prompts.py``), the audio tokenizer (``tokenizer/``).

What the real folder ships (public listings of stepfun-ai/Step-Audio-EditX and the reference
pipeline notes): a SentencePiece ``tokenizer.model`` (unigram, 74 752 pieces with byte fallback,
the ``<audio_N>`` pieces at 65536 + N) and ``tokenizer_config.json``; a converted ``tokenizer.json``
may be present too. The reference loads them through ``AutoTokenizer`` with remote code allowed;
we never do. Order of preference:

1. ``tokenizer.json``: read by the Rust ``tokenizers`` library through transformers'
   ``PreTrainedTokenizerFast`` (special tokens from ``tokenizer_config.json``).
2. ``tokenizer.model``: transformers' generic fast tokenizer converts the SentencePiece model by
   its own settings (unigram or BPE as trained, its normalizer spec, byte fallback, user-defined
   pieces kept whole), so ``encode`` gives what ``SentencePieceProcessor.encode`` gives; the added
   tokens listed in ``tokenizer_config.json`` keep their ids. (Not the Llama tokenizer class: since
   transformers 5 it always builds a BPE model, which splits a unigram vocabulary differently;
   ``llm.prompts`` encodes target text behind a newline so a leading word-boundary piece never leaks in.)

A ``tokenizer_class`` or ``auto_map`` in ``tokenizer_config.json`` is ignored: it would name code.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import ModelError

log = logging.getLogger(__name__)

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE = "tokenizer.model"
TOKENIZER_FILES = (TOKENIZER_JSON, SENTENCEPIECE)


@dataclass(frozen=True)
class TextTokenizer:
    """A loaded tokenizer: ``encode`` text pieces, look up special ids."""

    tokenizer: Any      # a transformers PreTrainedTokenizerFast
    source: Path        # the file it was read from

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` without BOS or any other added special token."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def token_id(self, token: str) -> int | None:
        """The id of ``token`` if the vocabulary has it as one piece, else None."""
        tid = self.tokenizer.convert_tokens_to_ids(token)
        return None if tid is None or tid == self.tokenizer.unk_token_id and token != self.tokenizer.unk_token else tid

    @property
    def eos_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    @property
    def pad_id(self) -> int | None:
        return self.tokenizer.pad_token_id

    def __len__(self) -> int:
        return len(self.tokenizer)


def load_text_tokenizer(folder: Path | str) -> TextTokenizer:
    """The tokenizer in ``folder`` (see the module docstring for which file wins).

    Raises:
        ModelError: neither file is there, or the file does not load (the message names it).
    """
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    # Only the options that are data; never a class name or an auto_map.
    options: dict[str, Any] = {"local_files_only": True}
    if (folder / TOKENIZER_JSON).is_file():
        path, cls = folder / TOKENIZER_JSON, PreTrainedTokenizerFast
    elif (folder / SENTENCEPIECE).is_file():
        path, cls = folder / SENTENCEPIECE, PreTrainedTokenizerFast
        options.update(add_bos_token=False, add_eos_token=False)
    else:
        raise ModelError(f"no LLM tokenizer in {folder}: neither {TOKENIZER_JSON} nor {SENTENCEPIECE} is there")
    try:
        tokenizer = cls.from_pretrained(str(folder), **options)
    except Exception as exc:  # noqa: BLE001 -- tokenizers/sentencepiece raise bare or foreign types
        raise ModelError(f"{path}: the LLM tokenizer does not load ({type(exc).__name__}: {exc})") from None
    log.info("LLM tokenizer read from %s: %d ids, eos %s", path, len(tokenizer), tokenizer.eos_token_id)
    return TextTokenizer(tokenizer, path)
