"""The flow-matching mel decoder: tokens + prompt mel + speaker -> 50 Hz mel (non-streaming).

Owns: ``FlowDecoder`` (upstream ``CausalMaskedDiffWithXvec``) with its dual-codebook token
embedding, speaker projection, encoder projection, and ``ConditionalCFM`` (upstream
``CausalConditionalCFM``): a cosine time schedule, fixed-step Euler integration and
classifier-free guidance. State-dict keys equal the upstream ``flow.pt`` (605 keys shipped,
155 in the tiny fixture). Noise is an argument: the caller draws it from its own generator.
Does not own: token validation and reshaping, the prompt-mel alignment (``decoder/model.py``),
the conformer encoder (``decoder/encoder.py``), the DiT (``decoder/estimator.py``).

Shape legend:
    Tp, Tg  25 Hz token frames of the prompt / the generated part;  T = Tp + Tg
    M = 2·T 50 Hz mel frames;  C = 80 mel channels;  E = 192 speaker-embedding size
    tokens are [1, T, 2] int64: column 0 vq02 (0..1023, 1024 = pad), column 1 vq06 + 1025
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from decoder.config import FlowConfig
from decoder.encoder import UpsampleConformerEncoder
from decoder.estimator import DiT


class DualCodebookEmbedding(nn.Module):
    """One shared table for both token streams; the two halves are concatenated: [.., 2] -> [.., D]."""

    def __init__(self, vocab_size: int, input_size: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, input_size // 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.embedding(tokens[..., 0]), self.embedding(tokens[..., 1])], dim=-1)


def cosine_t_span(n_steps: int, *, device: torch.device | None = None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[n_steps + 1] times 1 - cos(s·pi/2), s = 0..1: small steps near the noise end."""
    s = torch.linspace(0, 1, n_steps + 1, device=device, dtype=dtype)
    return 1 - torch.cos(s * 0.5 * torch.pi)


class ConditionalCFM(nn.Module):
    """Euler solver of dx/dt = v(x, t) from noise (t = 0) to mel (t = 1), with guidance.

    Each step evaluates the estimator on a batch of two: the conditional row and an
    unconditional row whose mu, speaker and cond are zero; the velocity used is
    ``(1 + r)·v_cond - r·v_uncond`` with ``r = inference_cfg_rate`` (0.7 shipped).
    """

    def __init__(self, estimator: DiT, inference_cfg_rate: float = 0.7) -> None:
        super().__init__()
        self.estimator = estimator
        self.inference_cfg_rate = inference_cfg_rate

    def forward(self, z: torch.Tensor, mu: torch.Tensor, spks: torch.Tensor, cond: torch.Tensor,
                n_steps: int = 10) -> torch.Tensor:
        """
        Parameters:
            z: [1, C, M] initial noise;  mu: [1, C, M] encoder output;  spks: [1, C];
            cond: [1, C, M] prompt mel in its first frames, zeros after;  n_steps >= 1.
        Returns:
            [1, C, M] float32 mel (log-magnitude, 50 Hz).
        """
        # The ODE state and time stay float32 whatever the estimator's dtype (bf16/fp16 on a GPU):
        # ten small steps accumulate, and t near 0 needs more than bf16's 8 mantissa bits.
        # In float32 this is exactly the reference's arithmetic.
        dtype = mu.dtype
        t_span = cosine_t_span(n_steps, device=mu.device, dtype=torch.float32)
        mu_in = torch.cat([mu, torch.zeros_like(mu)], dim=0)
        spks_in = torch.cat([spks, torch.zeros_like(spks)], dim=0)
        cond_in = torch.cat([cond, torch.zeros_like(cond)], dim=0)
        r = self.inference_cfg_rate
        x = z.float()
        # The time is advanced by accumulating dt, as upstream does, so that its rounding matches.
        t, dt = t_span[0:1], t_span[1] - t_span[0]
        for step in range(1, n_steps + 1):
            x_in = torch.cat([x, x], dim=0).to(dtype)
            v = self.estimator(x_in, mu_in, torch.cat([t, t], dim=0), spks_in, cond_in).float()
            v_cond, v_uncond = v.chunk(2, dim=0)
            x = x + dt * ((1.0 + r) * v_cond - r * v_uncond)
            t = t + dt
            if step < n_steps:
                dt = t_span[step + 1] - t
        return x


class FlowDecoder(nn.Module):
    """Upstream ``CausalMaskedDiffWithXvec``: the parts between tokens and mel."""

    def __init__(self, cfg: FlowConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.input_embedding = DualCodebookEmbedding(cfg.vocab_size, cfg.embedding_size)
        self.spk_embed_affine_layer = nn.Linear(cfg.spk_embed_dim, cfg.output_size)
        self.encoder = UpsampleConformerEncoder(cfg.encoder)
        self.encoder_proj = nn.Linear(cfg.encoder.output_size, cfg.output_size)
        self.decoder = ConditionalCFM(DiT(cfg.estimator), cfg.inference_cfg_rate)

    @property
    def up_rate(self) -> int:
        """50 Hz mel frames per 25 Hz token frame (2)."""
        return self.cfg.encoder.up_stride

    def project_speaker(self, embedding: torch.Tensor) -> torch.Tensor:
        """[1, E] -> [1, C]: L2-normalise, then the affine projection."""
        return self.spk_embed_affine_layer(F.normalize(embedding, dim=1))

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """[1, T, 2] prompt+generated tokens -> mu [1, M, C] (time-major)."""
        # Upstream clamps negative ids to 0; the caller has already rejected them, so no clamp.
        return self.encoder_proj(self.encoder(self.input_embedding(tokens)))

    def inference(self, tokens: torch.Tensor, prompt_tokens: torch.Tensor, prompt_mel: torch.Tensor,
                  embedding: torch.Tensor, noise: torch.Tensor, n_steps: int = 10) -> torch.Tensor:
        """Mel of the generated part only.

        Parameters:
            tokens: [1, Tg, 2];  prompt_tokens: [1, Tp, 2];  prompt_mel: [1, 2·Tp, C] (already aligned)
            embedding: [1, E];  noise: [1, C, M] with M = 2·(Tp + Tg);  n_steps: Euler steps.
        Returns:
            [1, C, 2·Tg] mel.
        """
        spks = self.project_speaker(embedding)
        mu = self.encode(torch.cat([prompt_tokens, tokens], dim=1))
        return self.solve(mu, spks, prompt_mel, noise, n_steps)

    def solve(self, mu: torch.Tensor, spks: torch.Tensor, prompt_mel: torch.Tensor, noise: torch.Tensor,
              n_steps: int) -> torch.Tensor:
        """mu [1, M, C], spks [1, C], prompt_mel [1, Mp, C], noise [1, C, M] -> [1, C, M - Mp]."""
        mp = prompt_mel.size(1)
        cond = torch.zeros_like(mu)
        cond[:, :mp] = prompt_mel
        mel = self.decoder(noise, mu.transpose(1, 2).contiguous(), spks, cond.transpose(1, 2).contiguous(), n_steps)
        return mel[:, :, mp:]
