"""Reading model checkpoints safely and loading them strictly: one set of rules for every model.

Owns: finding a model's weights file (``<stem>.safetensors`` preferred over ``<stem>.pt``),
turning a ``.safetensors`` file or a torch pickle into a flat ``dict[str, Tensor]`` without
executing anything from the model folder, and the strict load that refuses a checkpoint whose
keys or shapes do not match the module (listing the missing and unexpected keys) before touching
it. Every failure is a ``ModelError`` naming the file. Used by the Paraformer encoder
(``tokenizer.paraformer_stream``) and the decoder (``decoder.model``, ``decoder.vocoder``).
Does not own: renaming keys between checkpoint styles (each model's loader does that first, e.g.
the HiFT weight-norm keys in ``decoder.vocoder``).

``.pt`` files are opened with ``torch.load(weights_only=True)``, torch's restricted unpickler that
only rebuilds tensors and plain containers; a file that needs anything else is refused.
Training checkpoints that nest the state dict under ``state_dict``, ``model_state_dict`` or
``model`` are unwrapped.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from core.errors import ModelError

log = logging.getLogger(__name__)

_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_WRAPPERS = ("state_dict", "model_state_dict", "model")   # where training checkpoints nest the weights


def find_weights(folder: str | Path, stem: str, *alternatives: str) -> Path:
    """The weights file of ``stem`` in ``folder``: ``<stem>.safetensors`` when present (it loads
    without unpickling anything, and faster), else ``<stem>.pt``, else the first of ``alternatives``
    (file names) that exists.

    Raises:
        ModelError: none of them exists (the message names them).
    """
    folder = Path(folder)
    names = [f"{stem}.safetensors", f"{stem}.pt", *(a for a in alternatives if a not in (f"{stem}.pt",))]
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise ModelError(f"{folder} has neither {' nor '.join(names)}")


def load_state_dict_file(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a state dict from ``path``.

    Parameters:
        path: a ``.safetensors`` file, or a torch pickle (``.pt``/``.pth``/``.bin``/``.ckpt``)
            holding a flat ``{name: tensor}`` dict (see the module docstring for wrappers).
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
    for wrapper in _WRAPPERS:
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
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


def load_strict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], name: str) -> None:
    """``module.load_state_dict(state_dict, strict=True)`` that fails before touching the module.

    ``name`` opens every error message: say which model and file, e.g. ``"flow (flow.pt)"``.

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
