"""Running the LLM on a batch of prompts.

Owns: left-padded batched generation with an attention mask, per-row seeds and per-row stopping,
prefill/decode timing. Uses transformers' ``generate`` loop (so the model's own remote code
handles its cache and positions) with greedy selection over the one-hot scores that
:class:`llm.sampling.SeededSampler` produces.
Does not own: when requests are batched (``llm.batching``), prompt building, output filtering.

Shapes: batch input [B, P] int64 left-padded to the longest prompt P; output [B, P + T].
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from llm.loader import LoadedLLM
from llm.prompts import BOS_ID
from llm.sampling import SamplingConfig, SeededSampler, answer_ids

log = logging.getLogger(__name__)
_batch_ids = itertools.count(1)


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    seed: int


@dataclass(frozen=True)
class GenerationOutput:
    """One row's answer: its ids up to (not including) the end-of-answer id, and timings."""

    answer: tuple[int, ...]
    prefill_ms: float          # the batch's prompt pass (shared by its rows)
    decode_ms: float           # the batch's token-by-token part
    batch_size: int
    batch_id: int = 0          # rows of one batch share it
    steps: int = 0             # decoding steps the batch ran
    sampling_ms: float = 0.0   # of prefill + decode, the time spent in the sampler


def generate_batch(llm: LoadedLLM, requests: Sequence[GenerationRequest],
                   config: SamplingConfig) -> list[GenerationOutput]:
    """Generate an answer for every request in one padded batch.

    Each row samples with its own ``torch.Generator`` seeded from its request, so a row's ids do
    not depend on what it is batched with (up to floating-point differences that padding causes
    in the logits; see docs/performance.md).

    Raises:
        ValueError: a prompt is empty or longer than ``config.max_length - 1``.
    """
    from transformers import GenerationConfig, LogitsProcessorList

    lens = [len(r.prompt_ids) for r in requests]
    for n in lens:
        if not 0 < n < config.max_length:
            raise ValueError(f"prompt of {n} ids does not fit the LLM's {config.max_length}-id limit")
    width = max(lens)
    ids = torch.full((len(requests), width), llm.pad_id, dtype=torch.long)
    mask = torch.zeros((len(requests), width), dtype=torch.long)
    for row, r in enumerate(requests):
        ids[row, width - lens[row]:] = torch.tensor(r.prompt_ids, dtype=torch.long)
        mask[row, width - lens[row]:] = 1
    ids, mask = ids.to(llm.device), mask.to(llm.device)
    sampler = SeededSampler(config, [r.seed for r in requests], lens, llm.eos_id, llm.eos_ids, llm.device)
    max_new = max(sampler.budgets)
    gen_config = GenerationConfig(do_sample=False, max_new_tokens=max_new, eos_token_id=list(llm.eos_ids),
                                  pad_token_id=llm.pad_id, bos_token_id=BOS_ID, num_beams=1, use_cache=True)
    start = time.perf_counter()
    with torch.inference_mode():
        out = llm.model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_config,
                                 logits_processor=LogitsProcessorList([sampler]))
    end = time.perf_counter()
    first = sampler.first_step_at or end
    prefill_ms, decode_ms = (first - start) * 1000.0, (end - first) * 1000.0
    new = out[:, width:].cpu().tolist()
    batch_id = next(_batch_ids)
    results = [GenerationOutput(tuple(answer_ids(row, llm.eos_ids)), prefill_ms, decode_ms, len(requests), batch_id,
                                sampler.steps, sampler.busy_s * 1000.0)
               for row in new]
    log.debug("LLM batch of %d: prompts %s, %d steps, prefill %.1f ms, decode %.1f ms",
              len(requests), lens, sampler.steps, prefill_ms, decode_ms)
    return results
