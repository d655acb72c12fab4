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

How we compute the same numbers (issue 25): keys and values are never copied per head. With SDPA,
the H/G heads of a group become extra query rows of that group ([B,G,rep*S,D] against [B,G,K,D]),
and the bias (float32, cast to the dtype, as the reference) is built per block of queries of at most
``BIAS_BLOCK_BYTES`` instead of [B,H,S,K] at once. With FlexAttention the bias is a score
modification computed inside the kernel in float32 and a block mask skips each row's keys past its
last position. Pads write their keys to a scratch position (no boolean indexing), and callers pass
``width`` (keys read), so a forward never waits for the device.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import ModelError

log = logging.getLogger(__name__)
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
    """The reference's per-head slopes (see the module docstring), as Python floats holding float32 values.

    Computed as the reference does, in float32: the base 2^(-8/n) (and 2^(-4/n)) rounded to float32 once,
    then raised to integer powers in float32. Powers taken in float64 differ in the last float32 bit for
    most of the shipped model's 48 heads.
    """
    n = 2 ** int(math.floor(math.log2(heads)))
    cpu = torch.device("cpu")          # also when a model is built under ``with torch.device("meta")``
    base = torch.tensor(2.0 ** (-8.0 / n), dtype=torch.float32, device=cpu)
    slopes = torch.pow(base, torch.arange(1, n + 1, dtype=torch.int32, device=cpu))
    if n < heads:
        extra = torch.tensor(2.0 ** (-4.0 / n), dtype=torch.float32, device=cpu)
        powers = torch.arange(1, 2 * (heads - n), 2, dtype=torch.int32, device=cpu)
        slopes = torch.cat([slopes, torch.pow(extra, powers)])
    return slopes.tolist()


class KVCache:
    """Keys and values of every layer for ``slots`` rows of up to ``max_len`` positions.

    ``keys[l]``, ``values[l]``: [R, M + 1, G, D]. A row owns one slot; position p of the row lives at
    ``[slot, p]``. Position M is scratch: padding tokens write there (so writes need no boolean
    indexing, which would wait for the device) and nothing ever reads it. The cache keeps no lengths:
    callers pass each token's position to the model, and :meth:`clear` a slot when a new row takes it.
    """

    def __init__(self, config: Step1Config, slots: int, max_len: int, device: torch.device | str,
                 dtype: torch.dtype) -> None:
        if slots < 1 or max_len < 1:
            raise ValueError(f"a KV cache needs at least one slot and one position, not {slots} x {max_len}")
        shape = (slots, max_len + 1, config.num_attention_groups, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.slots, self.max_len = slots, max_len

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def clear(self, slot: int) -> None:
        """Zero ``slot`` in every layer. Masked-out keys still enter ``q k^T`` (then get -inf): a non-finite
        value an earlier row left there would turn the new row's softmax into NaN."""
        for t in self.keys + self.values:
            t[slot].zero_()


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(var + self.eps).to(x.dtype) * self.weight


# Most bytes of float32 bias (and so of SDPA's score matrix) one query block may hold: a 512-token prefill
# chunk at K = 8192 with 48 heads is cut into blocks of 42 queries instead of one 805 MB bias.
BIAS_BLOCK_BYTES = 64 * 2**20
ATTENTION = ("auto", "sdpa", "flex")
_flex_compiled: dict[str, Any] = {}


class _Step:
    """What every layer of one forward shares: where tokens write, which slots and how many keys rows read,
    and the position information the attention needs (built once per forward, device ops only)."""

    def __init__(self, positions: torch.Tensor, slots: torch.Tensor, width: int, scratch: int,
                 slopes: torch.Tensor, impl: str) -> None:
        b, s = positions.shape
        self.impl, self.width, self.slopes = impl, width, slopes
        self._whole: torch.Tensor | None = None
        self.write_slot = slots[:, None].expand(b, s)
        self.write_pos = torch.where(positions >= 0, positions, torch.full_like(positions, scratch))
        self.read = slots
        # A pad (position -1) attends to key 0 of its row, so its softmax stays finite; its output is unused.
        self.query = positions.clamp(min=0)
        if impl == "flex":
            self._flex_setup(b, s)
        else:
            distance = self.query[:, :, None] - torch.arange(width, device=positions.device)[None, None, :]
            # sqrt(i - j), +inf for keys after the query: -slope * inf = -inf masks them (slopes are positive),
            # so a block's bias is one multiplication.                                    [B,S,K] float32
            self.root = distance.clamp(min=0).float().sqrt().masked_fill(distance < 0, float("inf"))
            self.neg_slopes = -slopes
            self._buffer: torch.Tensor | None = None

    def _flex_setup(self, b: int, s: int) -> None:
        from torch.nn.attention.flex_attention import create_block_mask

        query = self.query

        def mask_mod(bi, h, qi, ki):
            return ki <= query[bi, qi]

        # Per-row key lengths: blocks of keys past a row's last position are skipped, not computed and masked.
        self.block_mask = create_block_mask(mask_mod, b, None, s, self.width, device=query.device)

    def bias(self, start: int, stop: int, groups: int, dtype: torch.dtype) -> torch.Tensor:
        """[B,G,rep*(stop-start),K]: the reference's bias for query rows ``start:stop``, heads grouped by
        key/value group (head h = g * rep + r), in ``dtype`` as the reference casts it. A bias covering
        every query (a decode step, a short chunk) is built once and shared by all layers."""
        whole = start == 0 and stop == self.root.shape[1]
        if whole and self._whole is not None:
            return self._whole
        b = self.root.shape[0]
        slopes = self.neg_slopes.view(1, groups, -1, 1, 1)
        root = self.root[:, None, None, start:stop]
        if whole or dtype != torch.float32:
            bias = (slopes * root).to(dtype)                                               # [B,G,rep,s,K]
        else:
            # Blocks of one forward reuse one buffer: no fresh 64 MB (zeroed pages) per block and layer.
            if self._buffer is None:
                self._buffer = torch.empty(b, groups, slopes.shape[2], stop - start, self.width,
                                           device=root.device)
            bias = torch.mul(slopes, root, out=self._buffer[:, :, :, :stop - start])
        bias = bias.reshape(b, groups, -1, self.width)
        if whole:
            self._whole = bias
        return bias


def _flex_attend(q, k, v, query, slopes, block_mask):
    """FlexAttention with the reference's bias as a score modification, computed in float32:
    -slope[h] * sqrt(i - j) (keys after the query are cut by ``block_mask``). The score function is made
    inside, so a compiled version sees only tensors and the block mask as inputs (no new closure per call)."""
    from torch.nn.attention.flex_attention import flex_attention

    def score_mod(score, b, h, qi, ki):
        return score - slopes[h] * (query[b, qi] - ki).clamp(min=0).to(torch.float32).sqrt()

    return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=True)


def _flex(device: torch.device):
    if device.type != "cuda":
        return _flex_attend             # eager: exact but slow; CPU tests use it to check the maths
    if "cuda" not in _flex_compiled:
        _flex_compiled["cuda"] = torch.compile(_flex_attend)
    return _flex_compiled["cuda"]


class StepAttention(nn.Module):
    def __init__(self, config: Step1Config) -> None:
        super().__init__()
        e, d = config.hidden_size, config.head_dim
        self.heads, self.groups, self.head_dim = config.num_attention_heads, config.num_attention_groups, d
        self.q_proj = nn.Linear(e, self.heads * d, bias=False)
        self.k_proj = nn.Linear(e, self.groups * d, bias=False)
        self.v_proj = nn.Linear(e, self.groups * d, bias=False)
        self.o_proj = nn.Linear(self.heads * d, e, bias=False)

    def forward(self, x: torch.Tensor, step: _Step, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """x [B,S,E]; keys/values [R,M+1,G,D] (this layer's cache). Returns [B,S,E]."""
        b, s, _ = x.shape
        g, d, rep = self.groups, self.head_dim, self.heads // self.groups
        k = self.k_proj(x).view(b, s, g, d)
        v = self.v_proj(x).view(b, s, g, d)
        keys.index_put_((step.write_slot, step.write_pos), k)        # pads all land on the scratch position
        values.index_put_((step.write_slot, step.write_pos), v)
        # Each row's keys, once per group ([B,G,K,D]): no copy per head.
        k_all = keys[step.read, :step.width].transpose(1, 2)
        v_all = values[step.read, :step.width].transpose(1, 2)
        if step.impl == "flex":
            q = self.q_proj(x).view(b, s, self.heads, d).transpose(1, 2)                   # [B,H,S,D]
            out = _flex(x.device)(q, k_all, v_all, step.query, step.slopes, step.block_mask)
            out = out.transpose(1, 2).reshape(b, s, self.heads * d)
        else:
            # Heads of one group become extra query rows of that group: plain SDPA, keys read once per group.
            q = self.q_proj(x).view(b, s, g, rep, d).permute(0, 2, 3, 1, 4)                # [B,G,rep,S,D]
            per_query = b * self.heads * step.width * 4
            block = max(1, BIAS_BLOCK_BYTES // per_query)
            parts = []
            for start in range(0, s, block):
                stop = min(s, start + block)
                qb = q[:, :, :, start:stop].reshape(b, g, rep * (stop - start), d)
                ob = F.scaled_dot_product_attention(qb, k_all, v_all, attn_mask=step.bias(start, stop, g, x.dtype))
                parts.append(ob.view(b, g, rep, stop - start, d))
            out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=3)
            out = out.permute(0, 3, 1, 2, 4).reshape(b, s, self.heads * d)              # head h = g*rep + r
        return self.o_proj(out)


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

    def forward(self, x, step, keys, values):
        x = x + self.self_attn(self.input_layernorm(x), step, keys, values)
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

    ``attention`` picks the attention kernel: ``sdpa`` (grouped queries, the bias built per block of
    queries), ``flex`` (FlexAttention: the bias as a score modification, never materialised, and a block
    mask that skips each row's unused keys) or ``auto``: FlexAttention for multi-token calls on CUDA
    (compiled), SDPA otherwise (FlexAttention runs eagerly off CUDA, far slower than SDPA there; a one-token
    decode step's bias is small, and SDPA's step can be captured as a CUDA graph).
    """

    def __init__(self, config: Step1Config, attention: str = "auto") -> None:
        super().__init__()
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, not {attention!r}")
        self.config = config
        self.attention = attention
        self.model = Step1Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._slopes = alibi_slopes(config.num_attention_heads)
        self._slopes_on: dict[torch.device, torch.Tensor] = {}
        self._flex_failed = False

    def new_cache(self, slots: int, max_len: int) -> KVCache:
        """A zeroed cache on this model's device and dtype."""
        weight = self.lm_head.weight
        return KVCache(self.config, slots, max_len, weight.device, weight.dtype)

    def slopes_on(self, device: torch.device) -> torch.Tensor:
        """The slopes as a float32 tensor on ``device`` (made once: a CUDA graph capture may not copy)."""
        if device not in self._slopes_on:
            self._slopes_on[device] = torch.tensor(self._slopes, dtype=torch.float32, device=device)
        return self._slopes_on[device]

    def impl_for(self, device: torch.device, tokens: int) -> str:
        if self.attention != "auto":
            return self.attention
        return "flex" if device.type == "cuda" and tokens > 1 and not self._flex_failed else "sdpa"

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, slots: torch.Tensor,
                logits_at: torch.Tensor | None = None, width: int | None = None) -> torch.Tensor:
        """Run ``input_ids`` through the model, writing their keys/values into ``cache``.

        Parameters:
            input_ids: [B,S] int64.
            positions: [B,S] int64, each token's position in its own row; -1 marks padding. A row's
                positions must continue what its slot already holds (0, 1, ... for a new row).
            cache: the keys/values; row b reads and writes slot ``slots[b]``.
            slots: [B] int64, distinct.
            logits_at: [B] int64 index into S per row: return only those logits ([B,V]); None: [B,S,V].
            width: K, how many key positions every row reads; at least the largest position + 1 (more is
                allowed: keys after a query's position are masked). None: computed from ``positions``,
                which waits for the device; the decode loop passes it from what it knows on the host.

        Returns:
            Logits in the model's dtype.
        """
        if width is None:
            width = int(positions.max()) + 1
        if width > cache.max_len:
            raise ValueError(f"position {width - 1} is beyond the cache's {cache.max_len} positions")
        impl = self.impl_for(input_ids.device, input_ids.shape[1])
        try:
            return self._run(input_ids, positions, cache, slots, logits_at, width, impl)
        except Exception as exc:
            if impl != "flex" or self.attention != "auto":
                raise
            # "auto" chose FlexAttention (compiled on CUDA); a toolchain that cannot compile it must not take
            # the service down. Re-running rewrites the same cache entries, so the retry is exact.
            log.warning("FlexAttention failed on %s (%s: %s); prefill uses SDPA from now on", input_ids.device,
                        type(exc).__name__, exc)
            self._flex_failed = True
            return self._run(input_ids, positions, cache, slots, logits_at, width, "sdpa")

    def _run(self, input_ids, positions, cache, slots, logits_at, width: int, impl: str) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        step = _Step(positions, slots, width, cache.max_len, self.slopes_on(x.device), impl)
        for layer, keys, values in zip(self.model.layers, cache.keys, cache.values):
            x = layer(x, step, keys, values)
        if logits_at is not None:
            x = x[torch.arange(x.shape[0], device=x.device), logits_at]
        return self.lm_head(self.model.norm(x))

    @property
    def parameters_count(self) -> int:
        return sum(p.numel() for p in self.parameters())
