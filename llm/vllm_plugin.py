"""The Step-Audio sampling rules as a vLLM logits-processor plugin.

Owns: the per-request arguments a client sends to switch the rules on (``request_xargs`` /
``parse_xargs``), their tensor logic on vLLM's batch layout (:class:`StepAudioLogits`: the reference's
repetition ban and our 2:3 slot mask, row by row, for rows whose request asked for them), and the
vLLM class ``StepAudioLogitsProcessor`` that ``vllm serve`` loads::

    vllm serve <folder> --logits-processors llm.vllm_plugin:StepAudioLogitsProcessor ...

(with this repository's ``llm/`` and ``core/`` folders on the server's ``PYTHONPATH``).
Does not own: temperature, top-k/top-p, seeds, EOS and length (vLLM's own sampling parameters, which
the client sets), nor the native sampler (``llm.sampling``, whose functions this module reuses so that
both backends apply the same rules).

Written against vLLM 0.33's Model Runner V2 interface
(``vllm.v1.worker.gpu.sample.logits_processor.LogitsProcessor``: ``__init__(vllm_config, req_states)``,
``validate_params``, ``add_request(slot, params) -> bool``, ``apply_staged_writes``,
``apply(logits, ctx)``), which vLLM runs after its bias/penalty stages and before temperature and
top-k/top-p: the same order as the native sampler. The legacy V1 runner (``VLLM_USE_V2_MODEL_RUNNER=0``)
is not supported. Speculative decoding is not supported (draft rows would be judged on committed ids).

Importing this module never imports vLLM: the class is built on first attribute access, so the tensor
logic is testable where vLLM is not installed.

Shapes (vLLM's): ``logits`` [R, V] float32 (R rows of this step, V >= 70656); ``all_token_ids``
[S, max_model_len] committed prompt + answer ids per request slot; ``prompt_len``/``total_len`` [S];
``rows_to_slots`` [R].
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from core.audio_tokens import GROUP, VQ02_SLOTS
from llm.sampling import slot_allowed

PLUGIN_FQCN = "llm.vllm_plugin:StepAudioLogitsProcessor"

XARG_WINDOW = "step_audio_repetition_window"   # int >= 1: the repetition ban's window (0 or absent: off)
XARG_SLOT_MASK = "step_audio_slot_mask"        # 0/1: the 2:3 slot mask
XARG_EOS = "step_audio_eos_ids"                # list[int]: ids the slot mask always lets through
MAX_WINDOW = 64
MAX_EOS = 4


def request_xargs(window: int, slot_mask: bool, eos_ids: Sequence[int]) -> dict[str, Any]:
    """The ``vllm_xargs`` (server) / ``SamplingParams.extra_args`` (in process) that switch the rules on."""
    return {XARG_WINDOW: int(window), XARG_SLOT_MASK: int(bool(slot_mask)), XARG_EOS: [int(t) for t in eos_ids]}


def parse_xargs(extra_args: Mapping[str, Any] | None) -> tuple[int, bool, tuple[int, ...]] | None:
    """(window, slot_mask, eos_ids) from a request's extra arguments; None when it asks for neither rule.

    Raises:
        ValueError: a value is of the wrong type or out of range (vLLM turns this into a 400).
    """
    args = extra_args or {}
    if XARG_WINDOW not in args and XARG_SLOT_MASK not in args:
        return None
    window, slot_mask, eos = args.get(XARG_WINDOW, 0), args.get(XARG_SLOT_MASK, 0), args.get(XARG_EOS, [])
    if isinstance(window, bool) or not isinstance(window, int) or not 0 <= window <= MAX_WINDOW:
        raise ValueError(f"{XARG_WINDOW} must be an integer from 0 to {MAX_WINDOW}, not {window!r}")
    if slot_mask not in (0, 1):
        raise ValueError(f"{XARG_SLOT_MASK} must be 0 or 1, not {slot_mask!r}")
    if not isinstance(eos, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in eos):
        raise ValueError(f"{XARG_EOS} must be a list of non-negative token ids, not {eos!r}")
    if slot_mask and not 1 <= len(eos) <= MAX_EOS:
        raise ValueError(f"{XARG_EOS} must list 1 to {MAX_EOS} end-of-answer ids when {XARG_SLOT_MASK} is on")
    if window == 0 and not slot_mask:
        return None
    return window, bool(slot_mask), tuple(eos)


def _on_device(buffer) -> torch.Tensor:
    """vLLM wraps its per-slot buffers (``StagedWriteTensor`` / ``UvaBackedTensor``); the device tensor is
    ``.gpu``. Plain tensors pass through."""
    return getattr(buffer, "gpu", buffer)


class StepAudioLogits:
    """The plugin's state and tensor logic, free of vLLM types.

    Parameters:
        max_num_reqs: request slots in vLLM's persistent batch.
        vocab_size: logits width.
        device: where the logits live.
        all_token_ids, prompt_len, total_len: vLLM's per-slot buffers (read only, read at every step).

    Per-slot settings are staged on the host in ``add_request`` and copied to the device once per step
    in ``apply_staged_writes``, as vLLM asks of processors.
    """

    def __init__(self, max_num_reqs: int, vocab_size: int, device: torch.device | str, all_token_ids,
                 prompt_len, total_len) -> None:
        self.device = torch.device(device)
        self._tokens, self._prompt_len, self._total_len = all_token_ids, prompt_len, total_len
        self._window = torch.zeros(max_num_reqs, dtype=torch.long)
        self._slot = torch.zeros(max_num_reqs, dtype=torch.bool)
        self._eos = torch.zeros((max_num_reqs, MAX_EOS), dtype=torch.long)
        self._window_dev = self._window.to(self.device)
        self._slot_dev = self._slot.to(self.device)
        self._eos_dev = self._eos.to(self.device)
        self._dirty = False
        self._max_window = 1
        # The native sampler's own masks (no end ids: those are restored per row in ``apply``).
        self._vq02_banned = ~slot_allowed(0, vocab_size, (), self.device)
        self._vq06_banned = ~slot_allowed(VQ02_SLOTS, vocab_size, (), self.device)

    def add_request(self, slot: int, extra_args: Mapping[str, Any] | None) -> bool:
        """(Re)initialise ``slot`` for a request entering the batch; True when a rule applies to it."""
        parsed = parse_xargs(extra_args)
        window, slot_mask, eos = parsed if parsed is not None else (0, False, ())
        self._window[slot] = window
        self._slot[slot] = slot_mask
        # Pad with a real end id (not -1) so that the scatter in ``apply`` writes each column's own value.
        padded = (list(eos) + [eos[0]] * MAX_EOS)[:MAX_EOS] if eos else [0] * MAX_EOS
        self._eos[slot] = torch.tensor(padded, dtype=torch.long)
        self._max_window = max(self._max_window, window)
        self._dirty = True
        return parsed is not None

    def apply_staged_writes(self) -> None:
        if self._dirty:
            self._window_dev.copy_(self._window, non_blocking=True)
            self._slot_dev.copy_(self._slot, non_blocking=True)
            self._eos_dev.copy_(self._eos, non_blocking=True)
            self._dirty = False

    def apply(self, logits: torch.Tensor, rows_to_slots: torch.Tensor) -> torch.Tensor:
        """Ban repeats and mask slots in the rows whose request asked for it; other rows are untouched.

        No host synchronisation: every decision is a device-side ``where``/mask.
        """
        slots = rows_to_slots.to(device=logits.device, dtype=torch.long)
        tokens = _on_device(self._tokens)
        total = _on_device(self._total_len)[slots].long()
        prompt = _on_device(self._prompt_len)[slots].long()
        rows = torch.arange(logits.shape[0], device=logits.device)

        # The reference's repetition ban: the last id, seen twice or more among the last ``window`` ids.
        window = self._window_dev[slots]
        width = self._max_window
        positions = total[:, None] - width + torch.arange(width, device=logits.device)
        in_window = (positions >= (total - window)[:, None]) & (positions >= 0)
        tail = tokens[slots[:, None], positions.clamp(min=0)].long()
        last = tokens[slots, (total - 1).clamp(min=0)].long()
        repeated = ((tail == last[:, None]) & in_window).sum(dim=1) >= 2
        ban = (window > 0) & repeated & (total >= window)
        current = logits[rows, last]
        logits[rows, last] = torch.where(ban, torch.full_like(current, float("-inf")), current)

        # The slot mask: answer position ``total - prompt`` decides vq02 or vq06; end ids stay as they are.
        slot_on = self._slot_dev[slots]
        vq02 = (total - prompt) % GROUP < VQ02_SLOTS
        banned = torch.where(vq02[:, None], self._vq02_banned[None, :], self._vq06_banned[None, :])
        eos = self._eos_dev[slots]
        kept = logits.gather(1, eos)
        logits.masked_fill_(banned & slot_on[:, None], float("-inf"))
        logits.scatter_(1, eos, kept)
        return logits


def _build_vllm_class():
    try:
        from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor
    except ImportError as exc:
        raise ImportError("StepAudioLogitsProcessor needs vLLM 0.33 (Model Runner V2 logits processors); "
                          f"it is not importable here: {exc}") from exc

    class StepAudioLogitsProcessor(LogitsProcessor):
        """Step-Audio repetition ban + slot mask for requests that send ``request_xargs``."""

        def __init__(self, vllm_config, req_states) -> None:
            self.core = StepAudioLogits(req_states.max_num_reqs, req_states.vocab_size, req_states.device,
                                        req_states.all_token_ids, req_states.prompt_len, req_states.total_len)

        @classmethod
        def validate_params(cls, sampling_params) -> None:
            parse_xargs(sampling_params.extra_args)

        def add_request(self, req_idx: int, sampling_params) -> bool:
            return self.core.add_request(req_idx, sampling_params.extra_args)

        def apply_staged_writes(self) -> None:
            self.core.apply_staged_writes()

        def apply(self, logits: torch.Tensor, ctx) -> torch.Tensor:
            return self.core.apply(logits, ctx.expanded_idx_mapping)

    StepAudioLogitsProcessor.__module__ = __name__
    StepAudioLogitsProcessor.__qualname__ = "StepAudioLogitsProcessor"
    return StepAudioLogitsProcessor


def __getattr__(name: str):
    # vLLM resolves the FQCN with getattr(module, "StepAudioLogitsProcessor"): build the class then.
    if name == "StepAudioLogitsProcessor":
        cls = _build_vllm_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
