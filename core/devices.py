"""Torch device and precision choices.

Owns: turning the ``device``/``dtype``/``tf32`` settings into torch objects and flags. Nothing
here touches the GPU at import; CUDA is only queried when a function is called.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` is CUDA when available, else CPU; an explicit CUDA device without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for, but torch sees no CUDA device")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on CUDA and float32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"dtype must be auto or one of {', '.join(_DTYPES)}, not {name!r}")
    return _DTYPES[name]


def configure_tf32(enabled: bool) -> None:
    """Allow (or forbid) TF32 in CUDA matmuls and cuDNN convolutions.

    The flags are process-wide in torch; setting them on a CPU-only machine is harmless, and
    keeps the configuration observable in tests.
    """
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    log.debug("TF32 %s (matmul and cuDNN)", "enabled" if enabled else "disabled")


def numerics_class(device: str | torch.device, tf32: bool) -> str:
    """The arithmetic a device computes prompt tokens with: ``cpu-fp32``, ``cuda-fp32`` or ``cuda-tf32``.

    Goes into the tokens' cache namespace: TF32 rounds matmul inputs to a 10-bit mantissa (about
    1e-3 relative), enough to move Paraformer encoder frames across a near-tie between two
    codebook centroids (the golden fixture's smallest vq02 margin is 0.0089) and to change vq06
    codes from ONNX Runtime's CUDA provider, so tokens computed under one class are not served
    to another.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return "cpu-fp32"
    return f"{device.type}-{'tf32' if tf32 else 'fp32'}"


def check_allocation(device: str | torch.device) -> tuple[bool, str]:
    """(ok, reason): whether a small allocation and a synchronize work on ``device``.

    Used by readiness probes: a wedged or lost CUDA device fails here. Always ``(True, "ok")`` for
    a CPU device. Never raises.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return True, "ok"
    try:
        probe = torch.ones(256, device=device)
        torch.cuda.synchronize(device)
        del probe
    except Exception as exc:  # any CUDA failure means "not ready", with the reason
        return False, f"CUDA allocation on {device} failed: {exc}"
    return True, "ok"


def configure_threads(torch_threads: int) -> None:
    """Set torch's CPU thread count (0 keeps torch's default of one per core).

    On a small or shared CPU, fewer threads than cores often run the streaming encoder faster,
    because its many small matmuls lose more to thread hand-off than they gain.
    """
    if torch_threads > 0:
        torch.set_num_threads(torch_threads)
        log.info("torch uses %d CPU thread(s)", torch_threads)
