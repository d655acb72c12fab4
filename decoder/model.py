"""The audio decoder as one object: load ``CosyVoice-300M-25Hz/``, then tokens -> 24 kHz speech.

Owns: ``AudioDecoder`` (loading the folder strictly, prompt features, ``token2wav``), reshaping
the mixed token sequence into 25 Hz frames exactly as the reference does, aligning the prompt mel,
the reference's bf16 rounding of the prompt features, and where the randomness comes from
(one ``torch.Generator`` per call, seeded by the caller).
Does not own: the networks (``decoder/flow.py``, ``decoder/vocoder.py``), the prompt frontend
(``decoder/frontend.py``), reading the yaml (``decoder/config.py``), the token layout and its
slot check (``core.audio_tokens``; callers pass mixed ids 0..5119, i.e. LLM id - 65536), reading
checkpoints (``core.checkpoint``).

Shape legend:
    L  mixed tokens (5 per 120 ms group: 2 vq02 ids 0..1023, then 3 ids 1024 + vq06 in 1024..5119)
    T3 = 3·ceil(L / 5) 25 Hz token frames;  M = 2·T3 50 Hz mel frames;  N = 480·M samples at 24 kHz

Randomness: with ``seed`` the flow's initial noise ``randn(1, 80, M_prompt + M_gen)`` is drawn
first from a CPU ``torch.Generator(seed)``, then the vocoder's phase and noise draws come from the
same generator, so one seed gives the same waveform on any device. The reference instead used a
noise buffer drawn once per process from the global RNG; tests inject that buffer (``noise``)
and the vocoder's captured draws (``hift_draws``) to reproduce it exactly.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from core.audio_io import Audio
from core.audio_tokens import GROUP, VQ02_CODES, VQ02_SLOTS, check_mixed
from core.checkpoint import find_weights, load_state_dict_file, load_strict
from decoder.config import DecoderConfig, load_decoder_config
from decoder.flow import FlowDecoder
from decoder.frontend import PromptFeatures, PromptFrontend
from decoder.vocoder import HiFTGenerator, load_hift_state_dict
from core.errors import InputError, ModelError
from core.onnx_session import OnnxOptions
from core.timings import Timer

log = logging.getLogger(__name__)

SAMPLE_RATE = 24000
VQ02_PAD = VQ02_CODES          # the vq02 column's pad in the third 25 Hz frame of each group
MAX_MEL_FRAMES = 30000         # the reference's noise buffer: 50 Hz x 600 s, prompt + generated
# Upstream pads a ragged tail with the end of this list: vq02 slots get 0, vq06 slots 1024 (code 0).
_TAIL_PAD = (0, 0, 0, 1024, 1024, 1024)
HIFT_DRAW_NAMES = ("rand_ini", "sine_noise", "uv_noise")


def reshape_mixed_tokens(mixed: Sequence[int]) -> torch.Tensor:
    """Mixed ids [L] -> time-aligned pairs [T3, 2] int64, as the reference's ``_reshape``.

    A ragged tail is padded with ``_TAIL_PAD``; each group [a, b, c, d, e] becomes the rows
    [a, c+1], [b, d+1], [1024, e+1] (column 0: vq02 with pad 1024; column 1: vq06 code + 1025).
    The input is not modified.
    """
    seq = list(mixed)
    if len(seq) % GROUP:
        seq += list(_TAIL_PAD[-(GROUP - len(seq) % GROUP):])
    groups = torch.tensor(seq, dtype=torch.long).view(-1, GROUP)
    vq02 = torch.cat([groups[:, :VQ02_SLOTS], torch.full_like(groups[:, :1], VQ02_PAD)], dim=1)
    vq06 = groups[:, VQ02_SLOTS:] + 1
    return torch.stack([vq02.reshape(-1), vq06.reshape(-1)], dim=1)


def align_prompt_mel(mel: torch.Tensor, frames: int) -> torch.Tensor:
    """[T, C] mel -> [1, frames, C] by nearest-neighbour resampling in time (stretch or squeeze).

    The mel comes from the untrimmed clip and the prompt tokens from the trimmed one; the
    reference reconciles them this way, giving exactly 2 mel frames per 25 Hz token frame.
    """
    return F.interpolate(mel.T.unsqueeze(0), size=frames, mode="nearest").transpose(1, 2)


def bf16_round(x: torch.Tensor) -> torch.Tensor:
    """Round float32 values to bfloat16 precision (kept float32).

    The reference casts the prompt mel and speaker embedding to bfloat16 before decoding
    (``tts.py`` l.165/228) and back to the flow's float32; we keep that rounding so that our
    output matches it. bf16 keeps about 3 significant digits; the difference is inaudible.
    """
    return x.to(torch.bfloat16).to(torch.float32)


def _as_float_tensor(x, shape_hint: str, what: str) -> torch.Tensor:
    try:
        # A copy: cached arrays are read-only and shared between requests.
        t = torch.tensor(np.asarray(x, dtype=np.float32)) if not isinstance(x, torch.Tensor) else x.float().cpu()
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a float array {shape_hint}") from None
    if not torch.isfinite(t).all():
        raise InputError(f"{what} contains NaN or infinite values")
    return t


class AudioDecoder:
    """CosyVoice-300M-25Hz: prompt features, and mixed tokens -> 24 kHz waveform. Thread-safe."""

    sample_rate = SAMPLE_RATE

    def __init__(self, config: DecoderConfig, flow: FlowDecoder, hift: torch.nn.Module, frontend: PromptFrontend,
                 *, device: torch.device, dtype: torch.dtype, n_steps: int = 10) -> None:
        self.config = config
        self.flow = flow
        self.hift = hift
        self.frontend = frontend
        self.device = device
        self.dtype = dtype
        self.n_steps = n_steps
        # 24 kHz samples per 50 Hz mel frame: prod(upsample_rates) x istft hop = 8·5·3·4 = 480.
        self.samples_per_frame = config.hift.upsample_scale

    @classmethod
    def from_dir(cls, folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 onnx_options: OnnxOptions = OnnxOptions(), n_steps: int = 10) -> "AudioDecoder":
        """Load ``cosyvoice.yaml``, ``flow.{safetensors,pt}``, ``hift.{safetensors,pt}``, ``campplus.onnx``.

        The flow runs in ``dtype`` on ``device``; the vocoder always runs in float32 (its source
        signal and inverse STFT need the precision; it is 12 % of the decoder's parameters).

        Raises:
            ModelError: a file is missing or unreadable, the yaml is unsupported, or a checkpoint
                does not fit the configured model (the message lists the offending keys).
        """
        if n_steps < 1:
            raise ValueError(f"n_steps must be at least 1, not {n_steps}")
        folder = Path(folder)
        if not (folder / "cosyvoice.yaml").is_file():
            raise ModelError(f"{folder} has no cosyvoice.yaml")
        if not (folder / "campplus.onnx").is_file():
            raise ModelError(f"{folder} has no campplus.onnx")
        device = torch.device(device)
        config = load_decoder_config(folder / "cosyvoice.yaml")
        flow_path, hift_path = find_weights(folder, "flow"), find_weights(folder, "hift")
        # Built on the meta device and given uninitialised storage: no 154 M-parameter random
        # init and no use of the global RNG; every tensor is then overwritten by the strict load.
        with torch.device("meta"):
            flow = FlowDecoder(config.flow)
        flow = flow.to_empty(device="cpu")
        load_strict(flow, load_state_dict_file(flow_path), f"flow ({flow_path.name})")
        flow = flow.to(device=device, dtype=dtype).eval()
        with torch.random.fork_rng(devices=[]):  # the vocoder's default init must not move the global RNG
            hift = HiFTGenerator(config.hift)
        load_hift_state_dict(hift, load_state_dict_file(hift_path), f"hift ({hift_path.name})")
        hift.fold_weight_norm()  # weights are fixed from here on: no per-call renormalisation
        hift = hift.to(device=device, dtype=torch.float32).eval()
        frontend = PromptFrontend(config.mel, folder / "campplus.onnx", onnx_options)
        log.info("audio decoder loaded from %s (%s, flow %s, %d Euler steps)", folder, device, dtype, n_steps)
        return cls(config, flow, hift, frontend, device=device, dtype=dtype, n_steps=n_steps)

    def _vocoder_generator(self, generator: torch.Generator) -> torch.Generator:
        """The vocoder draws on its own device: on CPU it continues the flow's generator; on an
        accelerator it gets a generator of that device seeded from the flow's (still one seed)."""
        if self.device.type == "cpu":
            return generator
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        return torch.Generator(device=self.device).manual_seed(seed)

    def prompt_features(self, audio: Audio) -> PromptFeatures:
        """The prompt clip's 24 kHz mel [T, 80] and CAM++ embedding [192] (see ``decoder/frontend.py``)."""
        return self.frontend.features(audio)

    @torch.inference_mode()
    def token2wav(self, tokens, prompt_tokens, prompt: PromptFeatures, seed: int | None = None,
                  n_steps: int | None = None, *, noise: torch.Tensor | None = None,
                  hift_draws: Mapping[str, torch.Tensor] | None = None, timer: Timer | None = None) -> Audio:
        """Speech for ``tokens`` in the voice of the prompt.

        Parameters:
            tokens: generated mixed ids [L] in 0..5119 (LLM ids - 65536, ``core.audio_tokens``),
                groups of 5 as in the legend; a ragged tail is padded as the reference does.
            prompt_tokens: the prompt clip's mixed ids [Lp], same format.
            prompt: the prompt's :class:`PromptFeatures`: ``mel`` [Tm, 80] float ([1, Tm, 80]
                accepted) and the CAM++ ``embedding`` [192] ([1, 192] accepted).
            seed: seeds the call's generator (flow noise, then vocoder draws); None: a fresh seed.
            n_steps: Euler steps (default: the decoder's, 10); fewer is faster and rougher.
            noise: [1, 80, >= M] initial flow noise to use instead of drawing it (tests, reproduction).
            hift_draws: the vocoder's three draws ``rand_ini`` [1, 9], ``sine_noise`` [1, N, 9],
                ``uv_noise`` [1, N, 1] instead of drawing them.
            timer: when given, gets stages ``decoder_encoder``, ``decoder_flow``, ``decoder_vocoder``.
        Returns:
            :class:`Audio` at 24 kHz: float32 [480·2·T3_gen] in [-0.99, 0.99].
        Raises:
            InputError: bad ids (see ``core.audio_tokens.check_mixed``), bad prompt arrays,
                n_steps < 1, or prompt + output longer than the 600 s the decoder supports.
        """
        gen = reshape_mixed_tokens(check_mixed(tokens, "tokens"))
        prompt_ids = reshape_mixed_tokens(check_mixed(prompt_tokens, "prompt_tokens"))
        steps = self.n_steps if n_steps is None else int(n_steps)
        if steps < 1:
            raise InputError(f"n_steps must be at least 1, not {steps}")
        up = self.flow.up_rate
        m_prompt, m_gen = up * prompt_ids.size(0), up * gen.size(0)
        if m_prompt + m_gen > MAX_MEL_FRAMES:
            raise InputError(f"prompt plus output would be {(m_prompt + m_gen) / 50:.1f} s; the decoder supports "
                             f"at most {MAX_MEL_FRAMES / 50:.0f} s in one call")
        mel = _as_float_tensor(prompt.mel, "[T, 80]", "prompt_mel")
        if mel.ndim == 3 and mel.size(0) == 1:
            mel = mel[0]
        n_mels = self.config.flow.output_size
        if mel.ndim != 2 or mel.size(1) != n_mels or mel.size(0) == 0:
            raise InputError(f"prompt_mel must have shape [T, {n_mels}] with T > 0, got {tuple(mel.shape)}")
        emb = _as_float_tensor(prompt.embedding, "[192]", "speaker_embedding").reshape(1, -1)
        if emb.size(1) != self.config.flow.spk_embed_dim:
            raise InputError(f"speaker_embedding must have {self.config.flow.spk_embed_dim} values, got {emb.size(1)}")
        if not emb.abs().sum() > 0:
            raise InputError("speaker_embedding is all zeros")

        generator = torch.Generator(device="cpu")
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(int(seed))
        m_total = m_prompt + m_gen
        if noise is None:
            noise = torch.randn(1, n_mels, m_total, generator=generator)
        elif (noise := torch.as_tensor(noise)).ndim != 3 or noise.shape[:2] != (1, n_mels) or noise.size(2) < m_total:
            raise InputError(f"noise must have shape [1, {n_mels}, >= {m_total}], got {tuple(noise.shape)}")
        if hift_draws is not None and set(hift_draws) != set(HIFT_DRAW_NAMES):
            raise InputError(f"hift_draws must have exactly the keys {', '.join(HIFT_DRAW_NAMES)}")

        to_flow = dict(device=self.device, dtype=self.dtype)
        timer = timer or Timer()
        # Stage times are only honest once the decoder's own device (not the current one) is idle.
        sync = (lambda: torch.cuda.synchronize(self.device)) if self.device.type == "cuda" else (lambda: None)
        with timer.stage("decoder_encoder"):
            spks = self.flow.project_speaker(bf16_round(emb).to(**to_flow))
            mu = self.flow.encode(torch.cat([prompt_ids, gen]).unsqueeze(0).to(self.device))
            sync()
        with timer.stage("decoder_flow"):
            cond = align_prompt_mel(bf16_round(mel), m_prompt).to(**to_flow)
            out_mel = self.flow.solve(mu, spks, cond, noise[:, :, :m_total].to(self.device, torch.float32), steps)
            sync()
        with timer.stage("decoder_vocoder"):
            draws = {k: v.to(self.device, torch.float32) for k, v in (hift_draws or {}).items()}
            extra = {} if draws else {"generator": self._vocoder_generator(generator)}
            wav, _ = self.hift.inference(out_mel.to(torch.float32), **extra, **draws)
            sync()
        audio = wav[0].to(device="cpu", dtype=torch.float32).numpy()
        expected = m_gen * self.samples_per_frame
        if audio.size != expected or not np.isfinite(audio).all():
            raise ModelError(f"the vocoder produced {audio.size} samples (expected {expected}) or non-finite values")
        return Audio(audio, SAMPLE_RATE)
