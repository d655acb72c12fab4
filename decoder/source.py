"""HiFT's neural source: harmonic sine excitation from a frame-rate F0 contour.

Owns: ``SineGen2`` (F0 -> 9 noisy harmonics at the audio rate) and ``SourceModuleHnNSF2``
(harmonics -> one excitation channel through ``l_linear`` + tanh), plus drawing or accepting
their random numbers. Does not own: predicting F0 or the filter network (``decoder/vocoder.py``).

Shape legend:
    B  batch
    T  mel frames (50 Hz for the shipped config)
    U  upsample_scale = prod(upsample_rates) * istft_hop (480): audio samples per frame
    L  audio samples = T * U
    H  nb_harmonics + 1 (the fundamental and its overtones; 9)

Randomness. The reference makes three draws per call, in this order: initial phases
``rand(B, H)`` (column 0 then zeroed), voiced/unvoiced noise ``randn(B, L, H)``, and a
noise-branch draw ``randn(B, L, 1)`` whose result it discards. We draw the same three from an
explicit ``torch.Generator`` (or take injected tensors), so a generator seeded like the
reference's global RNG yields the reference's numbers.

The phase is accumulated at frame rate and linearly interpolated up, as the reference does (its
per-sample rad/s is first linearly down-sampled by U). That down-sampler reads samples
``U*j + U/2 - 1`` and ``U*j + U/2`` of each frame, which hold the same nearest-upsampled F0, so
we compute the per-frame increments directly; the reference adds the initial phases to sample 0,
which that down-sampler never reads, so they cannot change its output and we only draw them.

Streaming: a chunk may start its harmonics at a given phase (``phase0``) and ask where they stand
after N frames (``SineGen2.phase_advance``), so consecutive chunks form one continuous excitation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import InputError


@dataclass(frozen=True)
class SourceDraws:
    """The random numbers of one source call (float32, on the source's device).

    rand_ini: [B, H] uniform [0, 1) initial phases as drawn (column 0 not yet zeroed).
    sine_noise: [B, L, H] standard normal. uv_noise: [B, L, 1] standard normal (unused by the output).
    """

    rand_ini: torch.Tensor
    sine_noise: torch.Tensor
    uv_noise: torch.Tensor


def draw_source_noise(batch: int, samples: int, harmonics: int, *, device: torch.device,
                      generator: torch.Generator | None = None, rand_ini: torch.Tensor | None = None,
                      sine_noise: torch.Tensor | None = None, uv_noise: torch.Tensor | None = None) -> SourceDraws:
    """Draw (in the reference's order) whatever was not injected.

    Parameters:
        batch, samples, harmonics: B, L and H.
        device: where drawn tensors live; ``generator`` must be on the same device.
        rand_ini, sine_noise, uv_noise: injected draws of the shapes in :class:`SourceDraws`.

    Raises:
        InputError: an injected tensor has the wrong shape.
    """
    shapes = {"rand_ini": (batch, harmonics), "sine_noise": (batch, samples, harmonics),
              "uv_noise": (batch, samples, 1)}
    given = {"rand_ini": rand_ini, "sine_noise": sine_noise, "uv_noise": uv_noise}
    out = {}
    for name, shape in shapes.items():
        tensor = given[name]
        if tensor is None and name == "sine_noise":
            # The reference draws this like a [B, H, L] tensor seen as [B, L, H] (randn_like of a
            # transposed tensor); filling that layout makes a seeded generator give its numbers.
            tensor = torch.empty((batch, harmonics, samples), device=device).transpose(1, 2)
            tensor.normal_(generator=generator)
        elif tensor is None:
            draw = torch.rand if name == "rand_ini" else torch.randn
            tensor = draw(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(tensor.shape) != shape:
            raise InputError(f"injected {name} has shape {tuple(tensor.shape)}, expected {shape}")
        out[name] = tensor.to(device=device, dtype=torch.float32)
    return SourceDraws(**out)


class SineGen2(nn.Module):
    """F0 [B, T] (Hz, frame rate) -> noisy harmonics [B, L, H] and voicing [B, L, 1] (float32).

    Voiced samples (F0 > ``voiced_threshold``) get ``sine_amp * sin(phase)`` plus noise of std
    ``noise_std``; unvoiced ones get noise of std ``sine_amp / 3`` only.
    """

    def __init__(self, sampling_rate: int, upsample_scale: int, harmonic_num: int, sine_amp: float,
                 noise_std: float, voiced_threshold: float) -> None:
        super().__init__()
        self.sampling_rate = sampling_rate
        self.upsample_scale = int(upsample_scale)
        self.dim = harmonic_num + 1
        self.sine_amp = sine_amp
        self.noise_std = noise_std
        self.voiced_threshold = voiced_threshold

    def _rad(self, f0: torch.Tensor) -> torch.Tensor:
        multiples = torch.arange(1, self.dim + 1, device=f0.device, dtype=torch.float32)
        # Per-frame phase increment in cycles per sample; the integer part is a whole turn.
        return (f0.float()[:, :, None] * multiples / self.sampling_rate) % 1  # [B, T, H]

    def phase_advance(self, f0: torch.Tensor, frames: int, phase0: torch.Tensor | None = None) -> torch.Tensor:
        """The harmonics' phase [B, H] (radians, in [0, 2·pi)) after the first ``frames`` frames of
        ``f0`` [B, T], starting from ``phase0``: what a chunk that begins at frame ``frames`` of
        this one passes as its ``phase0`` so that its sines continue these (streaming)."""
        cycles = (self._rad(f0)[:, :frames].double().sum(dim=1) * self.upsample_scale) % 1.0
        phase = cycles * (2 * math.pi)
        if phase0 is not None:
            phase = phase + phase0.double()
        return (phase % (2 * math.pi)).float()

    def forward(self, f0: torch.Tensor, draws: SourceDraws,
                phase0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``phase0`` [B, H]: phase (radians) the harmonics start from (None: 0, the whole-clip case)."""
        f0 = f0.float()
        rad = self._rad(f0)
        phase = torch.cumsum(rad, dim=1) * (2 * math.pi)
        # Each frame advances U samples, hence the scale before interpolating to sample rate.
        phase = phase.transpose(1, 2) * self.upsample_scale
        if phase0 is not None:
            phase = phase + phase0.to(phase.device, torch.float32)[:, :, None]
        phase = F.interpolate(phase, scale_factor=self.upsample_scale, mode="linear").transpose(1, 2)  # [B, L, H]
        sines = torch.sin(phase) * self.sine_amp
        uv = (f0 > self.voiced_threshold).float().repeat_interleave(self.upsample_scale, dim=1)[:, :, None]
        noise_amp = uv * self.noise_std + (1 - uv) * (self.sine_amp / 3)
        return sines * uv + noise_amp * draws.sine_noise, uv


class SourceModuleHnNSF2(nn.Module):
    """Harmonic-plus-noise source: F0 [B, T] -> excitation [B, L, 1] in (-1, 1), float32.

    State: ``l_linear`` (H -> 1) merging the harmonics, as in the checkpoint (``m_source.l_linear``).
    """

    def __init__(self, sampling_rate: int, upsample_scale: int, harmonic_num: int = 8, sine_amp: float = 0.1,
                 add_noise_std: float = 0.003, voiced_threshold: float = 10.0) -> None:
        super().__init__()
        self.l_sin_gen = SineGen2(sampling_rate, upsample_scale, harmonic_num, sine_amp, add_noise_std,
                                  voiced_threshold)
        self.l_linear = nn.Linear(harmonic_num + 1, 1)

    def forward(self, f0: torch.Tensor, draws: SourceDraws, phase0: torch.Tensor | None = None) -> torch.Tensor:
        sine_waves, _ = self.l_sin_gen(f0, draws, phase0)
        weight, bias = self.l_linear.weight.float(), self.l_linear.bias.float()
        return torch.tanh(F.linear(sine_waves, weight, bias))
