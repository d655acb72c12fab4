"""funasr's streaming SANM encoder (``SANMEncoderChunkOpt.forward_chunk``) computed for all chunks of a clip at once.

Owns: turning the per-chunk LFR features of one clip into the encoder output the chunk-by-chunk
streaming loop would produce, one batched step per layer instead of one small step per chunk and
layer, and the check that a loaded encoder has the structure this relies on.
Does not own: the frontend (fbank -> LFR -> CMVN, run per chunk by ``paraformer_stream``), loading
weights, k-means, the choice of path (``--vq02-encoder``).

Shape legend:
    C   chunks of the clip (one per 240 ms stride)
    n_i new LFR frames of chunk i (4, the last chunk often fewer)
    L_i rows chunk i runs through the layers: O overlap rows + n_i   (O = chunk_size[0] + chunk_size[2] = 5)
    R   all rows of all chunks, packed chunk after chunk (sum of L_i)
    P   rows of the padded per-chunk layout, C * Lmax (Lmax = max L_i)
    W   look-back rows of K/V a chunk attends to (encoder_look_back * chunk_size[1] = 16)
    F   input feature size (560), D model size (512 real), H heads, dk = D / H

Why the chunks are independent per layer. In the streaming loop each chunk is a short sequence of
its own: the O embedded frames before its new ones (the encoder's feature-overlap cache; zeros
before the clip starts) followed by its n_i new frames. At every layer its rows see only
  - its own rows from the layer below (norms, projections, feed-forward are per row; the FSMN
    memory is a depthwise convolution over the chunk's own rows, zero-padded at both ends), and
  - in attention, the keys/values of its own rows plus the look-back cache: the K/V that earlier
    chunks computed *at this layer* for their first ``L_j - chunk_size[2]`` rows ("stride" rows),
    of which the last W are kept.
None of that needs a later layer of an earlier chunk, so layer l of every chunk can run as soon as
layer l-1 of every chunk is done: one step per layer, the same arithmetic. Of each chunk's output
only the last n_i rows are kept (all rows when n_i is 0, as the streaming loop's ``enc[0, -0:]``).

Exactness: the same float32 operations on the same values, batched. Results differ from the
streaming loop only by summation order inside BLAS kernels and softmax (at most 6e-6 on the
real-size model, no code differing over 20 clips; see docs/performance.md), far below the k-means
code margins. That is the same kind of difference a thread count or BLAS build makes, which the
tokens' cache namespace does not key on either; so the namespace leaves the path out, and a clip
tokenized with one path is a valid hit for the other.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChunkLayout:
    """Index plan of one clip, shared by every layer (all tensors int64 on the encoder's device).

    ``pad_index`` ``[C, Lmax]`` maps each padded slot to its packed row, or to R (a zero row) when
    the slot is padding; ``history_index`` ``[C, W]`` maps each look-back slot to the packed row of
    an earlier chunk's stride row, or to R when there is no such row yet; ``valid`` ``[P]`` the
    padded slots that hold rows; ``keys_valid`` ``[C, 1, 1, W + Lmax]`` which keys a chunk sees;
    ``kept`` ``[T]`` the packed rows that form the output.
    """

    n_rows: int
    pad_index: torch.Tensor
    history_index: torch.Tensor
    valid: torch.Tensor
    keys_valid: torch.Tensor
    kept: torch.Tensor
    window: torch.Tensor   # [R] index into the zero-padded embedded frames: the rows of each chunk


def plan_chunks(new_frames: list[int], chunk_size: tuple[int, int, int], look_back: int,
                device: torch.device) -> ChunkLayout:
    """The index plan for chunks with ``new_frames[i]`` new LFR frames each.

    Parameters:
        new_frames: n_i per chunk, in order (each >= 0).
        chunk_size: ``(left, stride, right)`` in LFR frames, as given to ``init_cache``.
        look_back: chunks of K/V each layer keeps (> 0).
    """
    left, stride, right = chunk_size
    if right <= 0 or look_back <= 0:
        raise ValueError("the parallel encoder needs chunk_size[2] > 0 and a positive look-back")
    overlap = left + right
    lengths = [overlap + n for n in new_frames]
    n_rows, lmax, width = sum(lengths), max(lengths), look_back * stride
    starts = [0]
    for length in lengths[:-1]:
        starts.append(starts[-1] + length)
    pad_index = torch.full((len(lengths), lmax), n_rows, dtype=torch.long)
    history = torch.full((len(lengths), width), n_rows, dtype=torch.long)
    stride_rows: list[int] = []   # packed rows whose K/V enter the look-back cache, oldest first
    kept, window = [], []
    frame0 = 0                    # first row of the chunk in the zero-padded embedded frames
    for i, (start, length, n) in enumerate(zip(starts, lengths, new_frames)):
        pad_index[i, :length] = torch.arange(start, start + length)
        if stride_rows:
            recent = stride_rows[-width:]
            history[i, width - len(recent):] = torch.tensor(recent)
        stride_rows += range(start, start + length - right)
        kept += range(start + length - n, start + length) if n else range(start, start + length)
        window += range(frame0, frame0 + length)
        frame0 += n
    valid = pad_index.reshape(-1) < n_rows
    keys_valid = torch.cat([history < n_rows, pad_index < n_rows], dim=1)[:, None, None, :]
    to = dict(device=device)
    return ChunkLayout(n_rows, pad_index.to(**to), history.to(**to), valid.to(**to), keys_valid.to(**to),
                       torch.tensor(kept, dtype=torch.long, device=device),
                       torch.tensor(window, dtype=torch.long, device=device))


def check_supported(encoder: torch.nn.Module) -> None:
    """Raise ValueError (naming what differs) unless ``encoder`` is a SANM chunk encoder this module reproduces."""
    problems = []
    if type(encoder).__name__ != "SANMEncoderChunkOpt":
        problems.append(f"encoder class {type(encoder).__name__}")
    if type(getattr(encoder, "embed", None)).__name__ != "StreamSinusoidalPositionEncoder":
        problems.append("input layer other than pe_online")
    if not getattr(encoder, "normalize_before", False):
        problems.append("normalize_before false")
    for layer in [*getattr(encoder, "encoders0", []), *getattr(encoder, "encoders", [])]:
        attn = layer.self_attn
        if layer.concat_after or not all(hasattr(attn, a) for a in ("linear_q_k_v", "fsmn_block", "pad_fn")):
            problems.append("a layer that is not pre-norm SANM self-attention")
            break
    if problems:
        raise ValueError("the parallel vq02 encoder does not support " + ", ".join(problems))


def encode_parallel(encoder: torch.nn.Module, chunks: list[torch.Tensor], chunk_size: tuple[int, int, int],
                    look_back: int) -> torch.Tensor:
    """Encoder output of a whole clip, as the streaming loop gives it, with one batched step per layer.

    Parameters:
        encoder: a loaded ``SANMEncoderChunkOpt`` in eval mode (see :func:`check_supported`).
        chunks: the per-chunk encoder inputs ``[n_i, F]`` float32 (fbank -> LFR -> CMVN), in order.
        chunk_size, look_back: the streaming settings the output must match.
    Returns:
        ``[T, D]`` float32 on the encoder's device, T = sum of the kept rows per chunk.
    """
    device = next(encoder.parameters()).device
    layout = plan_chunks([len(c) for c in chunks], chunk_size, look_back, device)
    overlap = chunk_size[0] + chunk_size[2]
    feats = torch.cat(chunks, 0).to(device=device, dtype=torch.float32)
    feats = feats * encoder.output_size() ** 0.5
    # Positions count new frames across the whole clip from 1, as the streaming cache's start_idx does.
    # (computed on the CPU and moved, as funasr's encoder does: its timescales are CPU tensors)
    positions = torch.arange(1, len(feats) + 1)[None, :]
    feats = feats + encoder.embed.encode(positions, feats.shape[1], feats.dtype).to(device)[0]
    frames = torch.cat([feats.new_zeros(overlap, feats.shape[1]), feats], 0)   # the initial overlap cache is zeros
    x = frames[layout.window]                                                   # [R, F]
    for layer in [*encoder.encoders0, *encoder.encoders]:
        x = _layer(layer, x, layout)
    return encoder.after_norm(x[layout.kept])


def _layer(layer: torch.nn.Module, x: torch.Tensor, layout: ChunkLayout) -> torch.Tensor:
    """One ``EncoderLayerSANM.forward_chunk`` for every chunk: ``[R, Din]`` -> ``[R, D]``."""
    attn = layer.self_attn
    n_chunks, lmax = layout.pad_index.shape
    heads, dk = attn.h, attn.d_k
    qkv = attn.linear_q_k_v(layer.norm1(x))                                     # [R, 3D]
    qkv = torch.cat([qkv, qkv.new_zeros(1, qkv.shape[1])], 0)                   # row R: zeros for empty slots
    q, k, v = qkv[layout.pad_index].split(heads * dk, dim=-1)                   # [C, Lmax, D] each
    _, k_all, v_all = qkv.split(heads * dk, dim=-1)
    k_hist, v_hist = k_all[layout.history_index], v_all[layout.history_index]  # [C, W, D]

    def split_heads(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(n_chunks, -1, heads, dk).transpose(1, 2)               # [C, H, time, dk]

    # Padding slots of v are zero, so the convolution sees the same zero padding as a lone chunk.
    memory = attn.fsmn_block(attn.pad_fn(v.transpose(1, 2))).transpose(1, 2) + v
    keys = split_heads(torch.cat([k_hist, k], 1))                               # history first, as the cache
    values = split_heads(torch.cat([v_hist, v], 1))
    scores = torch.matmul(split_heads(q) * dk ** (-0.5), keys.transpose(-2, -1))
    weights = torch.softmax(scores.masked_fill(~layout.keys_valid, float("-inf")), dim=-1)
    context = torch.matmul(weights, values).transpose(1, 2).reshape(n_chunks * lmax, heads * dk)
    valid = layout.valid
    out = attn.linear_out(context[valid]) + memory.reshape(n_chunks * lmax, -1)[valid]   # [R, D]
    x = x + out if layer.in_size == layer.size else out
    return x + layer.feed_forward(layer.norm2(x))
