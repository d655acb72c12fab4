"""The flow-matching velocity estimator: a DiT with adaLN-Zero, causal conv and q/k-norm ("DiT-v5").

Owns: ``DiT`` and its parts (timestep embedder, blocks with attention, causal convolution and
MLP, final layer), with parameter names equal to the upstream checkpoint's
(``decoder.estimator.*`` keys of ``flow.pt``). Full (non-causal) attention over the whole
utterance, as the non-streaming reference runs it; ``forward_cached`` runs one chunk against the
keys/values and causal-conv tails of earlier frames (the streaming path), returning its own;
``time_conditioning`` gives the terms that depend on t alone, which that path computes once per
Euler step and reuses for every chunk.
Does not own: the ODE solver and classifier-free guidance (``decoder/flow.py``), which frames the
caches keep and for how long (``decoder/streaming.py``).

Shape legend:
    B  batch (2 during guidance: conditional + unconditional rows)
    C  80 mel channels;  Cin = 4·C = 320 input channels (x | mu | speaker | cond)
    T  50 Hz mel frames;  D hidden size (512 shipped);  H heads x Dh head_dim
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from decoder.config import DiTConfig


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> sinusoidal features of 1000·t (256) -> MLP -> [B, D]."""

    frequency_size = 256

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(self.frequency_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t [B] (any float dtype; the sinusoids are computed in float32) -> [B, D] in the MLP's dtype."""
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = (t.float() * 1000.0)[:, None] * freqs[None]
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class Attention(nn.Module):
    """Multi-head attention with per-head LayerNorm on q and k."""

    def __init__(self, dim: int, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        inner = num_heads * head_dim
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.q_norm = nn.LayerNorm(head_dim)
        self.k_norm = nn.LayerNorm(head_dim)
        self.proj = nn.Linear(inner, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)     # [B, H, T, Dh]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, D] -> [B, T, D]; no mask: the non-streaming decoder has no padded frames."""
        b, t, _ = x.shape
        q = self.q_norm(self._heads(self.to_q(x)))
        k = self.k_norm(self._heads(self.to_k(x)))
        v = self._heads(self.to_v(x))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, t, -1))

    def forward_cached(self, x: torch.Tensor, past: Sequence[tuple[torch.Tensor, torch.Tensor]] | None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A chunk [B, n, D] attending to itself and ``past``: (keys, values) [B, H, P_i, Dh]
        segments (one pair, or a list of pairs, e.g. prompt / held-back / recent frames).

        Returns (out [B, n, D], the chunk's own keys and values [B, H, n, Dh]). The DiT has no
        positional term, so the order of cached frames does not matter (only which are kept).
        The segments and the chunk are joined in one copy (the streaming path passes the
        prompt's shared keys as a segment rather than joining them beforehand).
        """
        b, n, _ = x.shape
        q = self.q_norm(self._heads(self.to_q(x)))
        k = self.k_norm(self._heads(self.to_k(x)))
        v = self._heads(self.to_v(x))
        if past is None:
            keys, values = k, v
        else:
            segments = [past] if isinstance(past[0], torch.Tensor) else list(past)
            keys = torch.cat([s[0] for s in segments] + [k], dim=2)
            values = torch.cat([s[1] for s in segments] + [v], dim=2)
        out = F.scaled_dot_product_attention(q, keys, values)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1)), k, v


class CausalConvBlock(nn.Module):
    """Causal Conv1d(k3) -> LayerNorm -> Mish -> causal Conv1d(k3), on [B, T, D].

    The parameters live under ``block.1``, ``block.3`` and ``block.6`` because upstream built this
    as an ``nn.Sequential`` with parameter-free transposes at the other indices.
    """

    kernel_size = 3

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block = nn.ModuleDict({
            "1": nn.Conv1d(channels, channels, self.kernel_size),
            "3": nn.LayerNorm(channels),
            "6": nn.Conv1d(channels, channels, self.kernel_size),
        })

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = (self.kernel_size - 1, 0)
        y = self.block["1"](F.pad(x.transpose(1, 2), pad)).transpose(1, 2)
        y = F.mish(self.block["3"](y))
        return self.block["6"](F.pad(y.transpose(1, 2), pad)).transpose(1, 2)

    def forward_cached(self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None
                       ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """A chunk [B, n, D] continuing the previous frames: ``cache`` holds each conv's last
        ``kernel_size - 1`` input frames [B, D, k-1] (None: zeros, as at the start)."""
        tail = self.kernel_size - 1
        x1 = x.transpose(1, 2)
        c1, c2 = cache if cache is not None else (x1.new_zeros(x1.size(0), x1.size(1), tail),) * 2
        x1 = torch.cat([c1, x1], dim=2)
        y = self.block["1"](x1).transpose(1, 2)
        y2 = torch.cat([c2, F.mish(self.block["3"](y)).transpose(1, 2)], dim=2)
        return self.block["6"](y2).transpose(1, 2), (x1[:, :, -tail:], y2[:, :, -tail:])


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """adaLN-Zero block: attention, then causal conv, then MLP, each shifted/scaled/gated by t."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.attn = Attention(d, cfg.num_heads, cfg.head_dim)
        self.conv = CausalConvBlock(d)
        self.mlp = MLP(d, int(d * cfg.mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 9 * d))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x [B, T, D], c [B, 1, D] -> [B, T, D]"""
        (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp,
         shift_conv, scale_conv, gate_conv) = self.adaLN_modulation(c).chunk(9, dim=-1)
        d = (x.size(-1),)
        x = x + gate_msa * self.attn(_modulate(F.layer_norm(x, d, eps=1e-6), shift_msa, scale_msa))
        x = x + gate_conv * self.conv(_modulate(F.layer_norm(x, d, eps=1e-6), shift_conv, scale_conv))
        return x + gate_mlp * self.mlp(_modulate(F.layer_norm(x, d, eps=1e-6), shift_mlp, scale_mlp))

    def modulation(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The nine shift/scale/gate rows [B, 1, D] for conditioning c [B, 1, D] (depends on t only)."""
        return self.adaLN_modulation(c).chunk(9, dim=-1)

    def forward_cached(self, x: torch.Tensor, c: torch.Tensor | None, past_kv: tuple | None, conv_cache: tuple | None,
                       modulation: tuple[torch.Tensor, ...] | None = None) -> tuple[torch.Tensor, tuple, tuple]:
        """:meth:`forward` on a chunk; returns (x, the chunk's (keys, values), the new conv cache).
        ``modulation``: :meth:`modulation` of ``c`` computed beforehand (then ``c`` is not used)."""
        (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp,
         shift_conv, scale_conv, gate_conv) = modulation if modulation is not None else self.modulation(c)
        d = (x.size(-1),)
        attended, k, v = self.attn.forward_cached(_modulate(F.layer_norm(x, d, eps=1e-6), shift_msa, scale_msa),
                                                  past_kv)
        x = x + gate_msa * attended
        conv, conv_cache = self.conv.forward_cached(_modulate(F.layer_norm(x, d, eps=1e-6), shift_conv, scale_conv),
                                                    conv_cache)
        x = x + gate_conv * conv
        return x + gate_mlp * self.mlp(_modulate(F.layer_norm(x, d, eps=1e-6), shift_mlp, scale_mlp)), (k, v), conv_cache


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, out_channels: int) -> None:
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.linear = nn.Linear(hidden_size, out_channels)

    def modulation(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return shift, scale

    def forward(self, x: torch.Tensor, c: torch.Tensor | None,
                modulation: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        shift, scale = modulation if modulation is not None else self.modulation(c)
        return self.linear(_modulate(F.layer_norm(x, (x.size(-1),), eps=1e-6), shift, scale))


class DiT(nn.Module):
    """Velocity field v(x, t | mu, speaker, cond): [B, C, T] inputs -> [B, C, T]."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.out_channels = cfg.out_channels
        self.t_embedder = TimestepEmbedder(cfg.hidden_size)
        self.in_proj = nn.Linear(cfg.in_channels, cfg.hidden_size)
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(cfg.hidden_size, cfg.out_channels)

    def forward(self, x: torch.Tensor, mu: torch.Tensor, t: torch.Tensor, spks: torch.Tensor,
                cond: torch.Tensor) -> torch.Tensor:
        """
        Parameters:
            x: [B, C, T] current sample;  mu: [B, C, T] encoder output;  t: [B] times in [0, 1]
            spks: [B, C] projected speaker embedding;  cond: [B, C, T] prompt mel (zeros after it)
        Returns:
            [B, C, T] velocity.
        """
        c = self.t_embedder(t).unsqueeze(1)                                       # [B, 1, D]
        spk = spks.unsqueeze(-1).expand(-1, -1, x.size(-1))
        h = self.in_proj(torch.cat([x, mu, spk, cond], dim=1).transpose(1, 2))   # [B, T, D]
        for block in self.blocks:
            h = block(h, c)
        return self.final_layer(h, c).transpose(1, 2)

    def time_conditioning(self, t: torch.Tensor) -> "TimeConditioning":
        """Everything the DiT derives from the time alone (the embedding's MLP and every block's
        adaLN rows): a chunked decode computes it once per Euler step and reuses it for every
        chunk, instead of re-reading those weights (a third of the DiT's) for each chunk."""
        c = self.t_embedder(t).unsqueeze(1)
        return TimeConditioning(tuple(block.modulation(c) for block in self.blocks), self.final_layer.modulation(c))

    def forward_cached(self, x: torch.Tensor, mu: torch.Tensor, t: torch.Tensor | None, spks: torch.Tensor,
                       cond: torch.Tensor, past_kv: list | None, conv_cache: list | None,
                       conditioning: "TimeConditioning | None" = None) -> tuple[torch.Tensor, list, list]:
        """:meth:`forward` on a chunk of frames that follows cached ones.

        Parameters:
            x, mu, cond: [B, C, n] for the chunk;  t: [B];  spks: [B, C].
            past_kv: per block the (keys, values) [B, H, P, Dh] of the frames it may attend to (one
                pair or a list of segments, see ``Attention.forward_cached``), or None.
            conv_cache: per block the causal convs' input tails (see ``CausalConvBlock``), or None.
            conditioning: :meth:`time_conditioning` of ``t`` computed beforehand (``t`` is then unused).
        Returns:
            (velocity [B, C, n], per block the chunk's own (keys, values), per block the new conv cache).
        """
        if conditioning is None:
            conditioning = self.time_conditioning(t)
        spk = spks.unsqueeze(-1).expand(-1, -1, x.size(-1))
        h = self.in_proj(torch.cat([x, mu, spk, cond], dim=1).transpose(1, 2))
        new_kv, new_conv = [], []
        for i, block in enumerate(self.blocks):
            h, kv, conv = block.forward_cached(h, None, past_kv[i] if past_kv else None,
                                               conv_cache[i] if conv_cache else None, conditioning.blocks[i])
            new_kv.append(kv)
            new_conv.append(conv)
        return self.final_layer(h, None, conditioning.final).transpose(1, 2), new_kv, new_conv


@dataclass(frozen=True)
class TimeConditioning:
    """The DiT's t-only terms for one time t: per block the nine adaLN rows, and the final layer's
    (shift, scale); each [B, 1, D]."""

    blocks: tuple
    final: tuple
