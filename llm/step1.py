"""The Step1 language model of Step-Audio-EditX, in plain torch.

Owns: ``Step1Config`` (read from ``config.json`` as data), the network (embedding, N pre-norm
decoder layers with sqrt-ALiBi grouped-query attention and a SwiGLU MLP, final RMSNorm, ``lm_head``)
and ``KVCache``, the keys/values the caller preallocates (one slot per row it runs).
Does not own: reading weights (``llm/checkpoint.py``), sampling and scheduling (``llm/native.py``).

Shape legend:
    B rows in one call;  S new tokens per row (padding included);  K key positions read (max position + 1)
    H attention heads;  G key/value groups (H % G == 0);  D = hidden / H head size
    E hidden size;  F intermediate size;  V vocabulary;  L layers;  R cache slots;  M cache length

The maths, as the reference ``modeling_step1.py`` computes it (golden README section 8):
    RMSNorm(x) = x * rsqrt(mean(x.float()^2) + eps).to(x.dtype) * weight
    attention  = softmax(q k^T / sqrt(D) + bias) v, k/v repeated H/G times with repeat_interleave
    bias[h, i, j] = -slope[h] * sqrt(i - j) for j <= i, -inf above; no RoPE, no position ids
    slopes: n = 2^floor(log2 H); (2^(-8/n))^k for k = 1..n, then (2^(-4/n))^m for m = 1, 3, 5, ...
    MLP = down(silu(gate(x)) * up(x)); no biases anywhere

Where we differ on purpose: positions are per row. Each token carries its own position in its row
(-1 for padding), keys are read from that row's cache slot, and the bias uses ``i - j`` of real
positions, so pads are never attended to and a padded row computes what it computes alone. (The
reference derives positions from the key length and ignores ``attention_mask``, so a left-padded
row attends to its pads.)
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import ModelError

MODEL_TYPE = "step1"
_REQUIRED = ("hidden_size", "intermediate_size", "num_attention_heads", "num_attention_groups",
             "num_hidden_layers", "vocab_size")


@dataclass(frozen=True)
class Step1Config:
    """The dimensions and special ids of a Step1 checkpoint (``config.json``).

    ``tie_word_embeddings`` is None when the file does not say (the reference's config defines no
    such key); the loader then uses ``lm_head.weight`` from the checkpoint whenever it is there.
    """

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_attention_groups: int
    num_hidden_layers: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    max_seq_len: int = 8192
    bos_token_id: int = 1
    eos_token_id: tuple[int, ...] = (3,)
    pad_token_id: int = 0
    tie_word_embeddings: bool | None = None

    def __post_init__(self) -> None:
        for name in _REQUIRED + ("max_seq_len",):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.num_attention_heads % self.num_attention_groups:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_attention_groups {self.num_attention_groups}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps must be positive, not {self.rms_norm_eps!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config.json") -> "Step1Config":
        """Build from a parsed ``config.json``; unknown keys are ignored.

        Raises:
            ModelError: ``model_type`` is not ``step1``, a required field is missing, or a value is bad
                (the message names ``source`` and the key).
        """
        if data.get("model_type") != MODEL_TYPE:
            raise ModelError(f"{source}: model_type is {data.get('model_type')!r}, expected {MODEL_TYPE!r} "
                             "(Step-Audio-EditX's Step1 LLM)")
        for key in _REQUIRED:
            if key not in data:
                raise ModelError(f"{source}: required field {key!r} is missing")
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data and data[k] is not None}
        if "eos_token_id" in fields:
            eos = fields["eos_token_id"]
            fields["eos_token_id"] = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        try:
            return cls(**fields)
        except (TypeError, ValueError) as exc:
            raise ModelError(f"{source}: {exc}") from None

    @classmethod
    def from_json(cls, path: Path | str) -> "Step1Config":
        """Read ``config.json`` as data (no code from the model folder runs).

        Raises:
            ModelError: the file is missing or not JSON, or :meth:`from_dict` refuses it.
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ModelError(f"{path} is missing") from None
        except (OSError, ValueError) as exc:
            raise ModelError(f"{path} is not readable JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ModelError(f"{path}: expected a JSON object")
        return cls.from_dict(data, str(path))

    def to_dict(self) -> dict[str, Any]:
        """The ``config.json`` form (with ``model_type`` and ``architectures``; no tie key when None)."""
        data = {"model_type": MODEL_TYPE, "architectures": ["Step1ForCausalLM"], **asdict(self)}
        data["eos_token_id"] = list(self.eos_token_id)
        if self.tie_word_embeddings is None:
            del data["tie_word_embeddings"]
        return data


def alibi_slopes(heads: int) -> list[float]:
    """The reference's per-head slopes (see the module docstring), as Python floats."""
    n = 2 ** int(math.floor(math.log2(heads)))
    base = 2.0 ** (-8.0 / n)
    slopes = [base ** k for k in range(1, n + 1)]
    if n < heads:
        extra = 2.0 ** (-4.0 / n)
        slopes += [extra ** m for m in range(1, 2 * (heads - n), 2)]
    return slopes


class KVCache:
    """Keys and values of every layer for ``slots`` rows of up to ``max_len`` positions.

    ``keys[l]``, ``values[l]``: [R, M, G, D]. A row owns one slot; position p of the row lives at
    ``[slot, p]``. The cache keeps no lengths: callers pass each token's position to the model.
    """

    def __init__(self, config: Step1Config, slots: int, max_len: int, device: torch.device | str,
                 dtype: torch.dtype) -> None:
        if slots < 1 or max_len < 1:
            raise ValueError(f"a KV cache needs at least one slot and one position, not {slots} x {max_len}")
        shape = (slots, max_len, config.num_attention_groups, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.slots, self.max_len = slots, max_len

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(var + self.eps).to(x.dtype) * self.weight


class StepAttention(nn.Module):
    def __init__(self, config: Step1Config) -> None:
        super().__init__()
        e, d = config.hidden_size, config.head_dim
        self.heads, self.groups, self.head_dim = config.num_attention_heads, config.num_attention_groups, d
        self.q_proj = nn.Linear(e, self.heads * d, bias=False)
        self.k_proj = nn.Linear(e, self.groups * d, bias=False)
        self.v_proj = nn.Linear(e, self.groups * d, bias=False)
        self.o_proj = nn.Linear(self.heads * d, e, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                write: tuple[torch.Tensor, torch.Tensor, torch.Tensor], read: torch.Tensor, width: int) -> torch.Tensor:
        """x [B,S,E]; bias [B,H,S,K]; keys/values [R,M,G,D] (this layer's cache); ``write`` = (mask [B,S],
        slot [N], position [N]) of the real tokens; ``read`` = slots [B]; ``width`` = K. Returns [B,S,E]."""
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)        # [B,H,S,D]
        k = self.k_proj(x).view(b, s, self.groups, self.head_dim)
        v = self.v_proj(x).view(b, s, self.groups, self.head_dim)
        real, slot, pos = write
        keys[slot, pos] = k[real]
        values[slot, pos] = v[real]
        rep = self.heads // self.groups
        k_all = keys[read, :width].transpose(1, 2).repeat_interleave(rep, dim=1)       # [B,H,K,D]
        v_all = values[read, :width].transpose(1, 2).repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=bias)           # scale 1/sqrt(D)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))


class StepMLP(nn.Module):
    def __init__(self, config: Step1Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class StepLayer(nn.Module):
    def __init__(self, config: Step1Config) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = StepAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = StepMLP(config)

    def forward(self, x, bias, keys, values, write, read, width):
        x = x + self.self_attn(self.input_layernorm(x), bias, keys, values, write, read, width)
        return x + self.mlp(self.post_attention_layernorm(x))


class Step1Model(nn.Module):
    def __init__(self, config: Step1Config) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(StepLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Step1ForCausalLM(nn.Module):
    """Step1 with the shipped parameter names (``model.*``, ``lm_head.weight``).

    Build it on the meta device and load weights with ``llm.checkpoint.load_step1``; call it with
    token ids, their per-row positions and a :class:`KVCache`.
    """

    def __init__(self, config: Step1Config) -> None:
        super().__init__()
        self.config = config
        self.model = Step1Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._slopes = alibi_slopes(config.num_attention_heads)
        self._slopes_on: dict[torch.device, torch.Tensor] = {}

    def new_cache(self, slots: int, max_len: int) -> KVCache:
        """A zeroed cache on this model's device and dtype."""
        weight = self.lm_head.weight
        return KVCache(self.config, slots, max_len, weight.device, weight.dtype)

    def _bias(self, positions: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
        """[B,H,S,K]: -slope * sqrt(i - j) for keys at or before the query, -inf elsewhere."""
        device = positions.device
        if device not in self._slopes_on:
            self._slopes_on[device] = torch.tensor(self._slopes, dtype=torch.float32, device=device)
        # A pad (position -1) attends to key 0 of its row, so its softmax stays finite; its output is unused.
        query = positions.clamp(min=0)
        distance = query[:, :, None] - torch.arange(width, device=device)[None, None, :]          # [B,S,K]
        bias = -self._slopes_on[device][None, :, None, None] * distance.clamp(min=0).float().sqrt()[:, None]
        return bias.masked_fill((distance < 0)[:, None], float("-inf")).to(dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, slots: torch.Tensor,
                logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """Run ``input_ids`` through the model, writing their keys/values into ``cache``.

        Parameters:
            input_ids: [B,S] int64.
            positions: [B,S] int64, each token's position in its own row; -1 marks padding. A row's
                positions must continue what its slot already holds (0, 1, ... for a new row).
            cache: the keys/values; row b reads and writes slot ``slots[b]``.
            slots: [B] int64, distinct.
            logits_at: [B] int64 index into S per row: return only those logits ([B,V]); None: [B,S,V].

        Returns:
            Logits in the model's dtype.
        """
        width = int(positions.max()) + 1
        if width > cache.max_len:
            raise ValueError(f"position {width - 1} is beyond the cache's {cache.max_len} positions")
        real = positions >= 0
        slot_of = slots[:, None].expand_as(positions)
        write = (real, slot_of[real], positions[real])
        x = self.model.embed_tokens(input_ids)
        bias = self._bias(positions, width, x.dtype)
        for layer, keys, values in zip(self.model.layers, cache.keys, cache.values):
            x = layer(x, bias, keys, values, write, slots, width)
        if logits_at is not None:
            x = x[torch.arange(x.shape[0], device=x.device), logits_at]
        return self.lm_head(self.model.norm(x))

    @property
    def parameters_count(self) -> int:
        return sum(p.numel() for p in self.parameters())
