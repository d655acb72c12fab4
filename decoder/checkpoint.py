"""Reading checkpoint files into plain state dicts, safely.

Owns: turning a ``.pt``/``.pth`` (a pickled state dict) or ``.safetensors`` file into a
``dict[str, Tensor]`` without executing anything from the model folder. Does not own: matching
keys to modules (each model's loader does that, strictly).

``.pt`` files are opened with ``torch.load(weights_only=True)``, torch's restricted unpickler that
only rebuilds tensors and plain containers; a file that needs anything else is refused.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Mapping

import torch

from core.errors import ModelError

log = logging.getLogger(__name__)

_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def load_state_dict_file(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a state dict from ``path``.

    Parameters:
        path: a ``.safetensors`` file, or a torch pickle (``.pt``/``.pth``/``.bin``/``.ckpt``)
            holding a flat ``{name: tensor}`` dict (a ``{"state_dict": {...}}`` wrapper is unwrapped).
        device: where the tensors are put.

    Returns:
        ``{key: tensor}`` in the file's dtypes.

    Raises:
        ModelError: the file is missing, has an unknown suffix, is corrupt, needs code to be
            unpickled, or does not hold a flat dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            state = load_file(str(path), device=str(device))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelError(f"could not read {path.name} as safetensors: {exc}") from None
    elif suffix in _TORCH_SUFFIXES:
        try:
            state = torch.load(str(path), map_location=device, weights_only=True)
        except pickle.UnpicklingError as exc:
            # weights_only refuses pickles that would run code; say so instead of a torch traceback.
            raise ModelError(f"{path.name} is not a plain tensor checkpoint (refused to unpickle: "
                             f"{str(exc).splitlines()[0]})") from None
        except (RuntimeError, OSError, EOFError, ValueError) as exc:
            raise ModelError(f"could not read {path.name} as a torch checkpoint: {exc}") from None
    else:
        raise ModelError(f"unknown checkpoint format {path.name!r}; expected .safetensors or .pt")
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path.name} does not hold a flat state dict of tensors")
    log.debug("read %d tensors from %s", len(state), path.name)
    return dict(state)


def format_key_mismatch(name: str, missing: list[str], unexpected: list[str], limit: int = 8) -> str:
    """A readable message for a strict-load failure, listing at most ``limit`` keys of each kind."""
    parts = [f"{name} checkpoint does not match the model"]
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            shown = ", ".join(sorted(keys)[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")
            parts.append(f"{label} keys: {shown}")
    return "; ".join(parts)


# Weight-norm key styles. torch >= 2.1's ``parametrizations.weight_norm`` saves g/v as
# ``<conv>.parametrizations.weight.original0/1``; the older ``nn.utils.weight_norm`` saves
# ``<conv>.weight_g``/``<conv>.weight_v``; a checkpoint whose norm was folded away has ``<conv>.weight``.
_PARAM_G = ".parametrizations.weight.original0"
_PARAM_V = ".parametrizations.weight.original1"


def normalize_weight_norm_keys(state_dict: Mapping[str, torch.Tensor],
                               expected_keys: set[str]) -> dict[str, torch.Tensor]:
    """Rewrite any weight-norm key style into the parametrization style used in ``expected_keys``.

    ``weight_g``/``weight_v`` are renamed (same tensors, same shapes). A folded ``<conv>.weight``
    where the model expects g/v is split back exactly: v = w, g = ||w|| over all but dim 0, which
    makes ``g * v / ||v||`` equal ``w``. Keys that need no change are passed through.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith(".weight_g"):
            out[key[: -len(".weight_g")] + _PARAM_G] = value
        elif key.endswith(".weight_v"):
            out[key[: -len(".weight_v")] + _PARAM_V] = value
        elif key.endswith(".weight") and key not in expected_keys and key[: -len(".weight")] + _PARAM_V in expected_keys:
            stem = key[: -len(".weight")]
            dims = tuple(range(1, value.dim()))
            out[stem + _PARAM_V] = value
            out[stem + _PARAM_G] = torch.linalg.vector_norm(value.float(), dim=dims, keepdim=True).to(value.dtype)
        else:
            out[key] = value
    return out


def load_strict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], name: str) -> None:
    """``module.load_state_dict(state_dict, strict=True)`` that fails before touching the module.

    Raises:
        ModelError: keys are missing or unexpected (both listed), or a tensor's shape differs.
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        raise ModelError(format_key_mismatch(name, missing, unexpected))
    wrong = [f"{k} {tuple(state_dict[k].shape)} (model {tuple(v.shape)})"
             for k, v in expected.items() if tuple(state_dict[k].shape) != tuple(v.shape)]
    if wrong:
        shown = ", ".join(wrong[:5]) + (f", ... ({len(wrong)} in all)" if len(wrong) > 5 else "")
        raise ModelError(f"{name} checkpoint has tensors of the wrong shape for this config: {shown}")
    module.load_state_dict(dict(state_dict), strict=True)
