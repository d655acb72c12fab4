"""HiFT vocoder: 80-bin log-mel at 50 Hz -> 24 kHz waveform (CosyVoice's ``HiFTGenerator``).

Owns: the HiFT configuration, the F0 predictor, the filter network (conv_pre, transposed-conv
up-sampling fused with the source's STFT, Snake resblocks, conv_post, iSTFT) and loading its
checkpoint strictly, in any weight-norm key style. Does not own: the harmonic source
(``decoder/source.py``), reading files and the strict-load rules (``core/checkpoint.py``) or the
flow that produces the mel.

Shape legend:
    B  batch
    M  mel bins (in_channels, 80)
    T  mel frames
    U  samples per frame = prod(upsample_rates) * istft_hop (8*5*3*4 = 480)
    L  samples = T * U (24 kHz)
    C  base_channels (512 shipped); stage i works on C / 2**(i+1) channels
    S  source STFT channels = istft_n_fft + 2 (real and imaginary halves of n_fft/2+1 bins)
    F  STFT frames of the source = L / istft_hop + 1

State-dict keys equal the reference checkpoint's: every weight-normed conv is a torch
``parametrizations.weight_norm`` (``<conv>.parametrizations.weight.original0/1``);
:func:`load_hift_state_dict` also accepts ``weight_g``/``weight_v`` and folded ``weight`` keys.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from core.checkpoint import load_strict
from decoder.source import SourceModuleHnNSF2, draw_source_noise
from core.errors import InputError, ModelError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class F0PredictorConfig:
    """``ConvRNNF0Predictor`` hyper-parameters (shipped values)."""

    num_class: int = 1
    in_channels: int = 80
    cond_channels: int = 512


@dataclass(frozen=True)
class HiFTConfig:
    """``HiFTGenerator`` hyper-parameters; defaults are the shipped CosyVoice-300M-25Hz values."""

    in_channels: int = 80
    base_channels: int = 512
    nb_harmonics: int = 8
    sampling_rate: int = 24000
    nsf_alpha: float = 0.1
    nsf_sigma: float = 0.003
    nsf_voiced_threshold: float = 10.0
    upsample_rates: tuple[int, ...] = (8, 5, 3)
    upsample_kernel_sizes: tuple[int, ...] = (16, 11, 7)
    istft_n_fft: int = 16
    istft_hop: int = 4
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    source_resblock_kernel_sizes: tuple[int, ...] = (7, 7, 11)
    source_resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    lrelu_slope: float = 0.1
    audio_limit: float = 0.99
    f0_predictor: F0PredictorConfig = field(default_factory=F0PredictorConfig)

    @property
    def upsample_scale(self) -> int:
        """Audio samples per mel frame (U)."""
        scale = self.istft_hop
        for rate in self.upsample_rates:
            scale *= rate
        return scale

    @classmethod
    def from_yaml_kwargs(cls, kwargs: Mapping[str, Any]) -> "HiFTConfig":
        """Build from the keyword arguments of the yaml's ``hift: !new:...HiFTGenerator`` node.

        ``istft_params: {n_fft, hop_len}`` maps to ``istft_n_fft``/``istft_hop``; ``f0_predictor``
        may be an :class:`F0PredictorConfig`, a mapping of its kwargs, or an object with a
        ``kwargs`` mapping (a parsed ``!new:`` node). Keys the yaml omits take the *reference
        constructor's* defaults (e.g. 22050 Hz), since that is what the reference would build.

        Raises:
            ModelError: unknown keys, a missing F0 predictor, or values of the wrong kind.
        """
        kwargs = dict(kwargs)
        unknown = sorted(set(kwargs) - set(_REFERENCE_DEFAULTS) - {"istft_params", "f0_predictor"})
        if unknown:
            raise ModelError(f"unknown HiFTGenerator arguments in the yaml: {', '.join(unknown)}")
        values = {**_REFERENCE_DEFAULTS, **{k: v for k, v in kwargs.items() if k in _REFERENCE_DEFAULTS}}
        istft = kwargs.get("istft_params", {"n_fft": 16, "hop_len": 4})
        if not isinstance(istft, Mapping) or set(istft) != {"n_fft", "hop_len"}:
            raise ModelError(f"hift istft_params must be {{n_fft, hop_len}}, got {istft!r}")
        try:
            for name in ("upsample_rates", "upsample_kernel_sizes", "resblock_kernel_sizes",
                         "source_resblock_kernel_sizes"):
                values[name] = tuple(int(v) for v in values[name])
            for name in ("resblock_dilation_sizes", "source_resblock_dilation_sizes"):
                values[name] = tuple(tuple(int(d) for d in row) for row in values[name])
            for name in ("in_channels", "base_channels", "nb_harmonics", "sampling_rate"):
                values[name] = int(values[name])
            for name in ("nsf_alpha", "nsf_sigma", "nsf_voiced_threshold", "lrelu_slope", "audio_limit"):
                values[name] = float(values[name])
        except (TypeError, ValueError) as exc:
            raise ModelError(f"hift section of the yaml has a malformed value: {exc}") from None
        return cls(**values, istft_n_fft=int(istft["n_fft"]), istft_hop=int(istft["hop_len"]),
                   f0_predictor=_f0_config(kwargs.get("f0_predictor")))


# The reference HiFTGenerator's constructor defaults (not the shipped values).
_REFERENCE_DEFAULTS: dict[str, Any] = dict(
    in_channels=80, base_channels=512, nb_harmonics=8, sampling_rate=22050, nsf_alpha=0.1, nsf_sigma=0.003,
    nsf_voiced_threshold=10, upsample_rates=[8, 8], upsample_kernel_sizes=[16, 16],
    resblock_kernel_sizes=[3, 7, 11], resblock_dilation_sizes=[[1, 3, 5]] * 3,
    source_resblock_kernel_sizes=[7, 11], source_resblock_dilation_sizes=[[1, 3, 5]] * 2,
    lrelu_slope=0.1, audio_limit=0.99)


def _f0_config(node: Any) -> F0PredictorConfig:
    if isinstance(node, F0PredictorConfig):
        return node
    if node is None:
        raise ModelError("the yaml's hift section has no f0_predictor")
    kwargs = node if isinstance(node, Mapping) else getattr(node, "kwargs", None)
    names = {f.name for f in fields(F0PredictorConfig)}
    if not isinstance(kwargs, Mapping) or set(kwargs) - names:
        raise ModelError(f"hift f0_predictor must be a ConvRNNF0Predictor with {sorted(names)}, got {node!r}")
    try:
        return F0PredictorConfig(**{k: int(v) for k, v in kwargs.items()})
    except (TypeError, ValueError) as exc:
        raise ModelError(f"hift f0_predictor has a malformed value: {exc}") from None


class Snake(nn.Module):
    """x + sin^2(alpha x) / alpha per channel on [B, C, T] (alpha on a linear scale)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha[None, :, None]
        return x + torch.sin(x * alpha).pow(2) / (alpha + 1e-9)


def _same_padding(kernel: int, dilation: int) -> int:
    return (kernel * dilation - dilation) // 2


class ResBlock(nn.Module):
    """Residual Snake -> dilated conv -> Snake -> conv stack; [B, C, T] -> [B, C, T]."""

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(
            weight_norm(nn.Conv1d(channels, channels, kernel_size, dilation=d, padding=_same_padding(kernel_size, d)))
            for d in dilations)
        self.convs2 = nn.ModuleList(
            weight_norm(nn.Conv1d(channels, channels, kernel_size, padding=_same_padding(kernel_size, 1)))
            for _ in dilations)
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for act1, conv1, act2, conv2 in zip(self.activations1, self.convs1, self.activations2, self.convs2):
            x = x + conv2(act2(conv1(act1(x))))
        return x


class ConvRNNF0Predictor(nn.Module):
    """Mel [B, M, T] -> F0 in Hz [B, T] (five weight-normed k3 convs with ELU, a linear head, abs)."""

    def __init__(self, cfg: F0PredictorConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(5):
            layers += [weight_norm(nn.Conv1d(cfg.in_channels if i == 0 else cfg.cond_channels, cfg.cond_channels,
                                             kernel_size=3, padding=1)), nn.ELU()]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(cfg.cond_channels, cfg.num_class)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        hidden = self.condnet(mel).transpose(1, 2)
        return self.classifier(hidden).squeeze(-1).abs()


class HiFTGenerator(nn.Module):
    """Neural source-filter + iSTFT vocoder (HiFTNet). Stateless at inference, so thread-safe."""

    def __init__(self, cfg: HiFTConfig = HiFTConfig()) -> None:
        super().__init__()
        if len(cfg.source_resblock_kernel_sizes) != len(cfg.upsample_rates):
            raise ModelError("hift needs one source resblock kernel size per upsample stage")
        self.cfg = cfg
        self.m_source = SourceModuleHnNSF2(cfg.sampling_rate, cfg.upsample_scale, cfg.nb_harmonics, cfg.nsf_alpha,
                                           cfg.nsf_sigma, cfg.nsf_voiced_threshold)
        base, spec = cfg.base_channels, cfg.istft_n_fft + 2
        self.conv_pre = weight_norm(nn.Conv1d(cfg.in_channels, base, 7, padding=3))
        self.ups = nn.ModuleList(
            weight_norm(nn.ConvTranspose1d(base // 2 ** i, base // 2 ** (i + 1), k, u, padding=(k - u) // 2))
            for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)))
        # Stage i sees the source STFT down-sampled to its own rate: by the product of the
        # up-sampling rates still to come (15, 3, 1 for [8, 5, 3]).
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        for i, (k, d) in enumerate(zip(cfg.source_resblock_kernel_sizes, cfg.source_resblock_dilation_sizes)):
            ch, factor = base // 2 ** (i + 1), 1
            for rate in cfg.upsample_rates[i + 1:]:
                factor *= rate
            self.source_downs.append(nn.Conv1d(spec, ch, 1) if factor == 1
                                     else nn.Conv1d(spec, ch, 2 * factor, factor, padding=factor // 2))
            self.source_resblocks.append(ResBlock(ch, k, tuple(d)))
        self.resblocks = nn.ModuleList(
            ResBlock(base // 2 ** (i + 1), k, tuple(d))
            for i in range(len(cfg.upsample_rates))
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes))
        self.conv_post = weight_norm(nn.Conv1d(base // 2 ** len(cfg.upsample_rates), spec, 7, padding=3))
        # Periodic Hann, as scipy's get_window("hann", fftbins=True); not part of the checkpoint.
        self.register_buffer("stft_window", torch.hann_window(cfg.istft_n_fft), persistent=False)
        self.f0_predictor = ConvRNNF0Predictor(cfg.f0_predictor)

    def _filter(self, mel: torch.Tensor, source_stft: torch.Tensor) -> torch.Tensor:
        """mel [B, M, T] and source STFT [B, S, F] -> log-magnitude ‖ phase logits [B, S, F]."""
        x = self.conv_pre(mel)
        n_kernels = len(self.cfg.resblock_kernel_sizes)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, self.cfg.lrelu_slope))
            if i == len(self.ups) - 1:
                x = F.pad(x, (1, 0), mode="reflect")  # the last transposed conv is one frame short of F
            x = x + self.source_resblocks[i](self.source_downs[i](source_stft))
            blocks = self.resblocks[i * n_kernels:(i + 1) * n_kernels]
            x = sum(block(x) for block in blocks) / n_kernels
        # The reference uses leaky_relu's default slope (0.01) here, not lrelu_slope.
        return self.conv_post(F.leaky_relu(x))

    def inference(self, mel: torch.Tensor, *, generator: torch.Generator | None = None,
                  rand_ini: torch.Tensor | None = None, sine_noise: torch.Tensor | None = None,
                  uv_noise: torch.Tensor | None = None, phase0: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Vocode a batch of mels.

        Parameters:
            mel: [B, M, T] log-mel at 50 Hz, T >= 1 (any float dtype; cast to the module's).
            generator: source of the three random draws (on the module's device); None means
                torch's global RNG.
            rand_ini, sine_noise, uv_noise: injected draws, [B, H], [B, L, H], [B, L, 1].
            phase0: [B, H] start phase of the harmonics in radians (None: 0); see ``stream_step``.

        Returns:
            (wav [B, L] float32 at ``sampling_rate`` clamped to +-audio_limit, source [B, 1, L] float32).

        Raises:
            InputError: mel has the wrong rank/channels, no frames, or non-finite values; an
                injected draw has the wrong shape; the generator is on another device type.
        """
        cfg = self.cfg
        if mel.dim() != 3 or mel.shape[1] != cfg.in_channels:
            raise InputError(f"vocoder input must be a mel of shape [B, {cfg.in_channels}, T], got {tuple(mel.shape)}")
        if mel.shape[0] == 0 or mel.shape[2] == 0:
            raise InputError(f"vocoder input has no frames (shape {tuple(mel.shape)})")
        if not torch.isfinite(mel).all():
            raise InputError("vocoder input mel contains NaN or infinite values")
        param = self.conv_post.bias
        if generator is not None and generator.device.type != param.device.type:
            raise InputError(f"the generator is on {generator.device}, the vocoder on {param.device}; "
                             "random draws must come from a generator on the vocoder's device")
        batch, frames = mel.shape[0], mel.shape[2]
        samples = frames * cfg.upsample_scale
        with torch.inference_mode():
            mel = mel.to(device=param.device, dtype=param.dtype)
            f0 = self.f0_predictor(mel)
            draws = draw_source_noise(batch, samples, cfg.nb_harmonics + 1, device=param.device, generator=generator,
                                      rand_ini=rand_ini, sine_noise=sine_noise, uv_noise=uv_noise)
            wav, source = self._vocode(mel, f0, draws, phase0)
        return wav, source

    def _vocode(self, mel: torch.Tensor, f0: torch.Tensor, draws, phase0: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """mel [B, M, T] (module dtype), f0 [B, T], the source draws -> (wav [B, L], source [B, 1, L])."""
        cfg, param = self.cfg, self.conv_post.bias
        source = self.m_source(f0, draws, phase0).transpose(1, 2)  # [B, 1, L] float32
        spec = torch.stft(source.squeeze(1), cfg.istft_n_fft, cfg.istft_hop, cfg.istft_n_fft,
                          window=self.stft_window.float(), return_complex=True)
        source_stft = torch.cat([spec.real, spec.imag], dim=1).to(param.dtype)
        x = self._filter(mel, source_stft).float()
        bins = cfg.istft_n_fft // 2 + 1
        magnitude = torch.exp(x[:, :bins]).clamp(max=1e2)
        phase = torch.sin(x[:, bins:])  # the reference's "phase" is sin() of the logits
        wav = torch.istft(torch.polar(magnitude, phase), cfg.istft_n_fft, cfg.istft_hop, cfg.istft_n_fft,
                          window=self.stft_window.float())
        return wav.clamp(-cfg.audio_limit, cfg.audio_limit), source

    @property
    def f0_context(self) -> int:
        """Mel frames on each side that change a frame's predicted F0 (5 for the shipped k3 convs)."""
        return sum(m.kernel_size[0] // 2 for m in self.f0_predictor.condnet if isinstance(m, nn.Conv1d))

    def stream_step(self, mel: torch.Tensor, draws, phase0: torch.Tensor | None, advance_frames: int,
                    context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Vocode one chunk of a stream.

        Parameters:
            mel: [1, M, T] (checked by the caller);  draws: the chunk's source draws (:func:`draw_source_noise`);
            phase0: the harmonics' start phase [1, H] (None: 0);  advance_frames: where the next chunk starts;
            context: up to ``f0_context`` mel frames [1, M, c] before ``mel``, so that the F0 of its
                first frames is what a whole-clip pass predicts (a phase error there would persist).
        Returns:
            (wav [1, L], the phase at frame ``advance_frames``, which the next chunk starts from).
        """
        param = self.conv_post.bias
        with torch.inference_mode():
            mel = mel.to(device=param.device, dtype=param.dtype)
            c = 0 if context is None else context.size(2)
            full = mel if not c else torch.cat([context.to(mel), mel], dim=2)
            f0 = self.f0_predictor(full)[:, c:]
            wav, _ = self._vocode(mel, f0, draws, phase0)
            return wav, self.m_source.l_sin_gen.phase_advance(f0, advance_frames, phase0)

    def f0(self, mel: torch.Tensor) -> torch.Tensor:
        """The predicted F0 in Hz, [B, T], for a mel [B, M, T] (diagnostics and tests)."""
        param = self.conv_post.bias
        with torch.inference_mode():
            return self.f0_predictor(mel.to(device=param.device, dtype=param.dtype)).float()

    def fold_weight_norm(self) -> "HiFTGenerator":
        """Replace every weight-norm parametrization by its current weight, in place.

        Call after loading: inference then skips renormalising each conv weight per call (1.2-1.35x
        faster on an H100, about the same on CPU; docs/performance.md). The state dict then holds
        plain ``<conv>.weight`` keys, so load checkpoints before folding, not after.
        """
        for module in self.modules():
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        return self


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


def load_hift_state_dict(module: HiFTGenerator, state_dict: Mapping[str, torch.Tensor], name: str = "HiFT") -> None:
    """Load a HiFT checkpoint strictly (``core.checkpoint.load_strict``), in any weight-norm key style.

    ``name`` starts the error messages; pass the file, e.g. ``"hift (hift.pt)"``.

    Raises:
        ModelError: missing/unexpected keys (listed) or tensors of the wrong shape.
    """
    expected = set(module.state_dict())
    load_strict(module, normalize_weight_norm_keys(state_dict, expected), name)
    log.debug("loaded HiFT weights (%d tensors)", len(expected))
