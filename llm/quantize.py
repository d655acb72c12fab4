"""Weight-only quantization of a loaded Step1 (``--llm-quantization none|int8|int4``), through torchao.

Owns: which modes exist, where each may run (``check_quantization``: int4 needs CUDA and bfloat16),
which layers are quantized (``quantize_step1``: the seven Linear projections of every decoder layer)
and how many bytes the weights then take (``weight_bytes``).
Does not own: loading the checkpoint (``llm/checkpoint.py``, strict, before this runs), the vLLM
backend (vLLM quantizes with its own ``--quantization``; this setting does not reach it).

Modes:
    none  the weights stay in ``--dtype``.
    int8  torchao ``Int8WeightOnlyConfig``: one symmetric int8 scale per output channel; activations
          stay in ``--dtype`` and the weights are dequantized inside the matmul. CPU and CUDA.
    int4  torchao ``Int4WeightOnlyConfig`` with the tile-packed layout (groups of 128 input channels),
          which runs torch's own tinygemm CUDA kernel (``aten._weight_int4pack_mm``): CUDA, bfloat16,
          compute capability 8.0 or newer, no extra package. torchao's default int4 layout needs the
          separate ``mslk`` package, which we do not ship.

Why only the decoder layers: they hold ~87% of Step1's 3.5 B parameters (3.07 B in 32 layers; the
74752 x 3072 embedding and ``lm_head`` the rest). The embedding is a lookup (no matmul to speed up) and ``lm_head`` scores every
id the sampler picks from, so both stay in full precision; norms are tiny.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from core.errors import ModelError

log = logging.getLogger(__name__)

QUANTIZATIONS = ("none", "int8", "int4")
INT4_GROUP_SIZE = 128
_SETTING = "--llm-quantization (STUDIO_LLM_QUANTIZATION)"


def check_quantization(mode: str, device: torch.device | str, dtype: torch.dtype) -> None:
    """Refuse a mode that cannot run on ``device``/``dtype``, before any weight is read.

    Raises:
        ModelError: unknown mode; int4 off CUDA or not in bfloat16 (the message names the setting).
    """
    if mode not in QUANTIZATIONS:
        raise ModelError(f"{_SETTING} must be one of {', '.join(QUANTIZATIONS)}, not {mode!r}")
    device = torch.device(device)
    if mode == "int4":
        if device.type != "cuda":
            raise ModelError(f"{_SETTING}=int4 needs a CUDA device (its 4-bit kernel is CUDA only); this LLM runs "
                             f"on {device}. Use int8 (CPU and CUDA) or none.")
        if dtype != torch.bfloat16:
            raise ModelError(f"{_SETTING}=int4 needs --dtype bfloat16 (its CUDA kernel takes bfloat16 "
                             f"activations), not {str(dtype).replace('torch.', '')}")


def _import_torchao():
    # At import torchao tries to load optional kernels (mxfp8, CUTLASS sm90) and logs a warning for each
    # one the installed torch build lacks (all of them on CPU), and torch logs a deprecation note about
    # how torchao registers an enum. We use none of those kernels, so the lines would only alarm
    # operators; a real failure still raises below.
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except ImportError as exc:
        raise ModelError(f"{_SETTING} needs the torchao package (pinned in requirements.txt): {exc}") from None
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    return quantize_, Int8WeightOnlyConfig, Int4WeightOnlyConfig


def _is_decoder_linear(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear) and fqn.startswith("model.layers.")


def quantize_step1(model: nn.Module, mode: str) -> nn.Module:
    """Quantize the decoder layers' Linear weights of a loaded Step1 in place (see the module docstring).

    Call :func:`check_quantization` first (before loading) so a refused mode costs no load time.

    Returns:
        ``model`` (the same object).

    Raises:
        ModelError: torchao is missing or refuses the weights (the message names the setting).
    """
    if mode == "none":
        return model
    weight = model.lm_head.weight
    check_quantization(mode, weight.device, weight.dtype)
    quantize_, int8_config, int4_config = _import_torchao()
    if mode == "int8":
        config = int8_config()
    else:
        config = int4_config(group_size=INT4_GROUP_SIZE, int4_packing_format="tile_packed_to_4d")
    before = weight_bytes(model)
    try:
        quantize_(model, config, filter_fn=_is_decoder_linear)
    except (RuntimeError, ValueError, AssertionError, ImportError) as exc:
        raise ModelError(f"{_SETTING}={mode} failed on this model: {exc}") from None
    after = weight_bytes(model)
    log.info("Step1 decoder weights quantized to %s: weights %.0f MB -> %.0f MB", mode, before / 2**20, after / 2**20)
    return model


def _tensor_bytes(t: torch.Tensor) -> int:
    # torchao weights are tensor subclasses whose real storage is in inner tensors (int8 data, scales);
    # the outer tensor reports the logical shape and dtype, so its numel * element_size would be wrong.
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is not None and type(t) not in (torch.Tensor, nn.Parameter):
        names, _ = flatten()
        return sum(_tensor_bytes(getattr(t, name)) for name in names if getattr(t, name) is not None)
    return t.numel() * t.element_size()


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's parameters really occupy (quantized storage counted as stored)."""
    return sum(_tensor_bytes(p) for p in model.parameters())
