"""The flow decoder's token encoder: ``UpsampleConformerEncoderV2`` (non-streaming path).

Owns: the conformer stack that turns embedded 25 Hz token frames into 50 Hz features: linear
embedding + ESPnet relative positional encoding, the pre-lookahead convolution, relative-position
self-attention layers, nearest x2 upsampling with a causal convolution, a second embedding and
conformer stack, and the final LayerNorm. Module and parameter names equal the upstream
checkpoint's (``encoder.*`` keys of ``flow.pt``) so ``load_state_dict(strict=True)`` works.
Chunked path (``forward_chunk``): the same layers run on one chunk of token frames at a time,
attending to the keys/values of every earlier chunk (``EncoderCache``), with the pre-lookahead
and upsampling convolutions continued from cached frames; the chunk's ``pre_lookahead_len``
look-ahead frames are passed with it and consumed, as the reference's streaming encoder does.
Does not own: token embedding, projection to mel, the chunk schedule (``decoder/streaming.py``).

Shape legend:
    B  batch (the non-streaming decoder always runs B = 1; there is no padding mask)
    T  25 Hz token frames (prompt + generated);  T2 = 2·T  50 Hz frames after upsampling
    D  model width (output_size; 512 shipped)   H heads, Dh = D / H per head
    P  2·T' - 1 relative positions for a sequence of T' frames
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from decoder.config import EncoderConfig

# Query rows per block of the relative-position attention: bounds the [H, rows, P] score tensor
# (at the 600 s cap T2 = 30 000 frames, a full [8, T2, 2·T2] fp32 tensor would need 57 GB).
ATTENTION_BLOCK_ROWS = 1024


@lru_cache(maxsize=8)
def _rel_positions(size: int, d_model: int) -> torch.Tensor:
    """ESPnet relative sinusoidal encodings [1, 2·size-1, D], positions size-1 ... -(size-1).

    Index ``k`` encodes the relative distance ``size-1-k`` (query minus key), so for query ``i``
    and key ``j`` the entry is ``k = size-1-i+j``. Always computed in float32, as upstream does.
    """
    position = torch.arange(size, dtype=torch.float32).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * -(math.log(10000.0) / d_model))
    positive = torch.zeros(size, d_model)
    negative = torch.zeros(size, d_model)
    positive[:, 0::2] = torch.sin(position * div_term)
    positive[:, 1::2] = torch.cos(position * div_term)
    negative[:, 0::2] = torch.sin(-position * div_term)
    negative[:, 1::2] = torch.cos(-position * div_term)
    return torch.cat([positive.flip(0), negative[1:]], dim=0).unsqueeze(0)


@dataclass(frozen=True)
class EncoderCache:
    """What the chunked encoder carries between chunks (all frames so far; the encoder is cheap).

    frames: 25 Hz frames encoded so far;  pre: [1, D, 2] pre-lookahead conv2 input tail;
    kv1 / kv2: per layer (keys, values) [1, H, frames (x stride for kv2), Dh];  up: [1, D, 2·stride].
    """

    frames: int
    pre: torch.Tensor
    kv1: tuple
    up: torch.Tensor
    kv2: tuple


class LinearEmbedding(nn.Module):
    """Linear + LayerNorm, then x·sqrt(D) and the relative positional table (no subsampling)."""

    def __init__(self, idim: int, odim: int) -> None:
        super().__init__()
        self.out = nn.Sequential(nn.Linear(idim, odim), nn.LayerNorm(odim, eps=1e-5))
        self.xscale = math.sqrt(odim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, idim] -> (x [B, T, D], pos_emb [1, 2T-1, D] in x's dtype and device)."""
        x = self.out(x) * self.xscale
        pos = _rel_positions(x.size(1), x.size(2)).to(device=x.device, dtype=x.dtype)
        return x, pos


class RelPositionAttention(nn.Module):
    """Multi-head self-attention with Transformer-XL relative positions (ESPnet ``rel_selfattn``)."""

    def __init__(self, n_head: int, n_feat: int, key_bias: bool = True) -> None:
        super().__init__()
        self.h = n_head
        self.d_k = n_feat // n_head
        self.linear_q = nn.Linear(n_feat, n_feat)
        self.linear_k = nn.Linear(n_feat, n_feat, bias=key_bias)
        self.linear_v = nn.Linear(n_feat, n_feat)
        self.linear_out = nn.Linear(n_feat, n_feat)
        self.linear_pos = nn.Linear(n_feat, n_feat, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(n_head, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.zeros(n_head, self.d_k))

    def forward(self, x: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
        """x [B, T, D], pos_emb [1, 2T-1, D] -> [B, T, D] (every frame attends to every frame)."""
        b, t, _ = x.shape
        q = self.linear_q(x).view(b, t, self.h, self.d_k)
        k = self.linear_k(x).view(b, t, self.h, self.d_k).transpose(1, 2)         # [B, H, T, Dh]
        v = self.linear_v(x).view(b, t, self.h, self.d_k).transpose(1, 2)
        return self._attend(q, k, v, pos_emb, 0)

    def forward_cached(self, x: torch.Tensor, pos_emb: torch.Tensor, past_k: torch.Tensor | None,
                       past_v: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One chunk x [B, n, D] after ``P`` cached frames; pos_emb covers all ``P + n`` frames.

        Returns (out [B, n, D], keys and values of all ``P + n`` frames [B, H, P + n, Dh]) for the next chunk.
        """
        b, n, _ = x.shape
        q = self.linear_q(x).view(b, n, self.h, self.d_k)
        k = self.linear_k(x).view(b, n, self.h, self.d_k).transpose(1, 2)
        v = self.linear_v(x).view(b, n, self.h, self.d_k).transpose(1, 2)
        offset = 0 if past_k is None else past_k.size(2)
        keys = k if past_k is None else torch.cat([past_k, k], dim=2)
        values = v if past_v is None else torch.cat([past_v, v], dim=2)
        return self._attend(q, keys, values, pos_emb, offset), keys, values

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos_emb: torch.Tensor,
                offset: int) -> torch.Tensor:
        """Queries [B, n, H, Dh] at absolute frames offset..offset+n-1 over keys/values [B, H, T, Dh]."""
        b, n = q.shape[:2]
        t = k.size(2)
        # Only the relative positions these rows use, [t-1-(offset+n-1), t-1-offset+t-1] of the
        # table: a chunk after many cached frames projects n+t-1 of them, not all 2t-1.
        low = t - offset - n
        p = self.linear_pos(pos_emb[:, low: 2 * t - 1 - offset])
        p = p.view(1, -1, self.h, self.d_k).transpose(1, 2)                      # [1, H, n+t-1, Dh]
        q_u = (q + self.pos_bias_u).transpose(1, 2)                                # content term
        q_v = (q + self.pos_bias_v).transpose(1, 2)                                # position term
        scale = 1.0 / math.sqrt(self.d_k)
        out = torch.empty((b, self.h, n, self.d_k), dtype=v.dtype, device=v.device)
        for start in range(0, n, ATTENTION_BLOCK_ROWS):
            stop = min(n, start + ATTENTION_BLOCK_ROWS)
            rows = stop - start
            first, last = offset + start, offset + stop   # absolute query frames of this block
            ac = torch.matmul(q_u[:, :, start:stop], k.transpose(-2, -1))         # [B, H, rows, T]
            # Row i needs relative indices T-1-i+j for j in [0, T): a window of rows+T-1 columns,
            # read diagonally (the "rel_shift" of ESPnet, done with strides instead of a pad).
            window = torch.matmul(q_v[:, :, start:stop],
                                  p[:, :, t - last - low: 2 * t - 1 - first - low].transpose(-2, -1))
            window = window.contiguous()                                           # [B, H, rows, rows+T-1]
            w = window.size(-1)
            bd = window.as_strided((b, self.h, rows, t), (self.h * rows * w, rows * w, w - 1, 1),
                                   window.storage_offset() + rows - 1)
            attn = torch.softmax((ac + bd) * scale, dim=-1)
            out[:, :, start:stop] = torch.matmul(attn, v)
        return self.linear_out(out.transpose(1, 2).reshape(b, n, self.h * self.d_k))


class FeedForward(nn.Module):
    """Position-wise Linear -> SiLU -> Linear."""

    def __init__(self, idim: int, hidden: int) -> None:
        super().__init__()
        self.w_1 = nn.Linear(idim, hidden)
        self.w_2 = nn.Linear(hidden, idim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.silu(self.w_1(x)))


class ConformerLayer(nn.Module):
    """Pre-norm block: x + MHSA(LN(x)), then x + FFN(LN(x)) (no conv module, no macaron FFN)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.self_attn = RelPositionAttention(cfg.attention_heads, cfg.output_size, cfg.key_bias)
        self.feed_forward = FeedForward(cfg.output_size, cfg.linear_units)
        self.norm_ff = nn.LayerNorm(cfg.output_size, eps=1e-12)
        self.norm_mha = nn.LayerNorm(cfg.output_size, eps=1e-12)

    def forward(self, x: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm_mha(x), pos_emb)
        return x + self.feed_forward(self.norm_ff(x))

    def forward_cached(self, x: torch.Tensor, pos_emb: torch.Tensor, past: tuple | None
                       ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One chunk after the cached frames ``past`` = (keys, values) or None; returns (x, all keys/values)."""
        past_k, past_v = past if past is not None else (None, None)
        attended, keys, values = self.self_attn.forward_cached(self.norm_mha(x), pos_emb, past_k, past_v)
        x = x + attended
        return x + self.feed_forward(self.norm_ff(x)), (keys, values)


class PreLookahead(nn.Module):
    """Residual conv pair: sees ``pre_lookahead_len`` future frames, then 2 past frames."""

    def __init__(self, channels: int, pre_lookahead_len: int) -> None:
        super().__init__()
        self.pre_lookahead_len = pre_lookahead_len
        self.conv1 = nn.Conv1d(channels, channels, kernel_size=pre_lookahead_len + 1)
        self.conv2 = nn.Conv1d(channels, channels, kernel_size=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, D] -> [B, T, D]"""
        y = F.pad(x.transpose(1, 2), (0, self.pre_lookahead_len))
        y = F.leaky_relu(self.conv1(y))
        y = self.conv2(F.pad(y, (2, 0)))
        return y.transpose(1, 2) + x

    def forward_chunk(self, x: torch.Tensor, cache: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, n + L, D] (the chunk and its L look-ahead frames) -> ([B, n, D], new cache [B, D, 2]).

        ``cache`` holds the last two conv1 outputs of the previous chunk (None: zeros, the start).
        """
        y = F.leaky_relu(self.conv1(x.transpose(1, 2)))                         # [B, D, n]
        if cache is None:
            cache = y.new_zeros(y.size(0), y.size(1), 2)
        y = torch.cat([cache, y], dim=2)
        out = self.conv2(y).transpose(1, 2) + x[:, :x.size(1) - self.pre_lookahead_len]
        return out, y[:, :, -2:]


class Upsample(nn.Module):
    """Nearest-neighbour x stride, left-pad 2·stride, Conv1d(kernel 2·stride+1): causal upsampling."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv1d(channels, channels, stride * 2 + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, D, T] -> [B, D, stride·T]"""
        y = F.interpolate(x, scale_factor=float(self.stride), mode="nearest")
        return self.conv(F.pad(y, (self.stride * 2, 0)))

    def forward_chunk(self, x: torch.Tensor, cache: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, D, n] -> ([B, D, stride·n], new cache): the last 2·stride upsampled frames (None: zeros)."""
        y = F.interpolate(x, scale_factor=float(self.stride), mode="nearest")
        if cache is None:
            cache = y.new_zeros(y.size(0), y.size(1), self.stride * 2)
        y = torch.cat([cache, y], dim=2)
        return self.conv(y), y[:, :, -self.stride * 2:]


class UpsampleConformerEncoder(nn.Module):
    """Token frames [B, T, D] (25 Hz) -> features [B, stride·T, D] (50 Hz)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = LinearEmbedding(cfg.input_size, cfg.output_size)
        self.pre_lookahead_layer = PreLookahead(cfg.output_size, cfg.pre_lookahead_len)
        self.encoders = nn.ModuleList(ConformerLayer(cfg) for _ in range(cfg.num_blocks))
        self.up_layer = Upsample(cfg.output_size, cfg.up_stride)
        self.up_embed = LinearEmbedding(cfg.input_size, cfg.output_size)
        self.up_encoders = nn.ModuleList(ConformerLayer(cfg) for _ in range(cfg.num_up_blocks))
        self.after_norm = nn.LayerNorm(cfg.output_size, eps=1e-5)

    def forward_chunk(self, xs: torch.Tensor, cache: "EncoderCache | None", last: bool = False
                      ) -> tuple[torch.Tensor, "EncoderCache"]:
        """One chunk of embedded token frames -> 50 Hz features, continuing ``cache``.

        Parameters:
            xs: [1, n + L, D_in] the chunk's n frames then L = pre_lookahead_len look-ahead frames
                (the next chunk's first frames); with ``last`` only the n frames (zeros are the
                look-ahead, as at the end of the non-chunked pass).
            cache: the state after the previous chunks (None: this is the first chunk).
        Returns:
            ([1, stride·n, D] features, the cache after this chunk).
        """
        cfg = self.cfg
        x = self.embed.out(xs) * self.embed.xscale
        if last:
            x = F.pad(x, (0, 0, 0, cfg.pre_lookahead_len))
        x, pre = self.pre_lookahead_layer.forward_chunk(x, cache.pre if cache else None)
        past1 = cache.frames if cache else 0
        pos = _rel_positions(past1 + x.size(1), x.size(2)).to(device=x.device, dtype=x.dtype)
        kv1 = []
        for i, layer in enumerate(self.encoders):
            x, kv = layer.forward_cached(x, pos, cache.kv1[i] if cache else None)
            kv1.append(kv)
        x, up = self.up_layer.forward_chunk(x.transpose(1, 2), cache.up if cache else None)
        x = self.up_embed.out(x.transpose(1, 2)) * self.up_embed.xscale
        pos = _rel_positions(past1 * cfg.up_stride + x.size(1), x.size(2)).to(device=x.device, dtype=x.dtype)
        kv2 = []
        for i, layer in enumerate(self.up_encoders):
            x, kv = layer.forward_cached(x, pos, cache.kv2[i] if cache else None)
            kv2.append(kv)
        n = xs.size(1) - (0 if last else cfg.pre_lookahead_len)
        return self.after_norm(x), EncoderCache(past1 + n, pre, tuple(kv1), up, tuple(kv2))

    def forward(self, xs: torch.Tensor) -> torch.Tensor:
        xs, pos = self.embed(xs)
        xs = self.pre_lookahead_layer(xs)
        for layer in self.encoders:
            xs = layer(xs, pos)
        xs = self.up_layer(xs.transpose(1, 2)).transpose(1, 2)
        xs, pos = self.up_embed(xs)
        for layer in self.up_encoders:
            xs = layer(xs, pos)
        return self.after_norm(xs)
