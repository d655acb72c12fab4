"""Chunked decoding: mixed audio ids arrive a few at a time, speech leaves in chunks.

Owns: ``StreamConfig`` (chunk schedule, mel overlap, the flow's left context), ``PromptState`` (the
per-voice flow state that does not depend on the new text), ``StreamingDecoder`` (builds prompt
states, keeps the recent ones in a byte-bounded LRU, opens sessions) and ``DecodeSession`` /
``VocoderStream`` (one stream's chunks). Does not own: the networks' chunk steps
(``forward_chunk`` / ``forward_cached`` in ``decoder/encoder.py`` and ``decoder/estimator.py``,
``HiFTGenerator.stream_step``), token checks and reshaping (``decoder/model.py``), where ids come
from (the engine).

How a stream is decoded (the reference's streaming path, ``token2wav_stream``, in our own terms):

- Token frames (25 Hz; 3 per group of 5 mixed ids) are cut into chunks of ``chunk_frames``
  (15, 24, 48, 96, then 192 repeated); a chunk is decoded once its frames and the encoder's 3
  look-ahead frames have arrived, so the first audio needs 18 frames = 30 LLM ids. The first
  chunk is small because it decides the time to first audio; later ones only have to stay ahead
  of playback, so they double (each roughly the audio already out), and fewer, longer chunks
  cost less fixed work per chunk (weights read, per-op overhead, vocoder overlap).
- Encoder: every chunk attends to all earlier frames (kept in ``EncoderCache``).
- Flow (DiT, every Euler step): a chunk attends to the prompt's frames, the last
  ``left_context_mel`` generated frames and itself; its causal convolutions continue from the
  previous chunk's last frames. Keys and values are kept per step, per block; the prompt's are
  the shared cached ones, joined with the chunk's own in the attention's single copy. The DiT's
  time-only terms (time embedding, every block's adaLN rows) are the same for every chunk, so
  they are computed once per step count (``StreamingDecoder.time_conditioning``).
- Vocoder: each chunk is vocoded together with the last ``overlap_mel`` mel frames of the
  previous one; the samples of those frames, held back from the previous chunk, are cross-faded
  (complementary sin^2/cos^2, so the first sample of a join is the held-back sample itself) into
  the new rendering; the harmonic source starts at the phase the previous chunk reached at the
  same frame (``phase0``), and the F0 predictor sees the 5 frames before the chunk, so the
  excitation runs on exactly as in a whole-clip pass (an F0 edge error would shift all later
  phases).
- The streamed waveform has exactly the non-streamed length (480 samples per mel frame).

Prompt state. The prompt's frames except its last ``pre_lookahead_len`` (which need the first
generated frames as look-ahead) are run once through the encoder and, for every Euler step, the
DiT, from a fixed noise (``PROMPT_NOISE_SEED``): that state depends only on the prompt clip and
the step count, so it is cached per (prompt digest, steps) and shared by every stream of the
voice. The held-back prompt frames are decoded with the first chunk (their mel is discarded).
Its size is about 1.3 MB per prompt mel frame at the shipped size in float32 (10 steps x 16
blocks x 2 guidance rows x keys and values), e.g. 300 MB for a 4.7 s prompt; the LRU's budget is
``settings.stream_prompt_cache_mb``.

Randomness: a session's flow noise (drawn per chunk, time-major) and vocoder draws come from one
``torch.Generator`` seeded by the caller, so a seed gives the same stream every time. The noise of
the prompt frames is fixed, not seeded, so the cached state fits every request.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from core.errors import InputError
from core.timings import Timer
from decoder.encoder import EncoderCache
from decoder.flow import cosine_t_span
from core.audio_tokens import GROUP, check_mixed
from decoder.model import (MAX_MEL_FRAMES, AudioDecoder, align_prompt_mel, bf16_round, reshape_mixed_tokens,
                           _as_float_tensor)
from decoder.source import SourceDraws, draw_source_noise

log = logging.getLogger(__name__)

PROMPT_NOISE_SEED = 20240607   # fixed: the cached prompt state must not depend on a request's seed
FRAMES_PER_GROUP = 3           # 25 Hz token frames per group of 5 mixed ids


@dataclass(frozen=True)
class StreamConfig:
    """The chunk schedule. ``chunk_frames``: 25 Hz token frames per chunk (the last size repeats;
    the first decides the time to first audio);
    ``overlap_mel``: 50 Hz mel frames re-vocoded and cross-faded at each join; ``left_context_mel``:
    generated mel frames the flow keeps attending to besides the prompt (96 = 1.92 s, as upstream)."""

    chunk_frames: tuple[int, ...] = (15, 24, 48, 96, 192)
    overlap_mel: int = 8
    left_context_mel: int = 96

    def __post_init__(self) -> None:
        if not self.chunk_frames or min(self.chunk_frames) < 1:
            raise ValueError(f"chunk_frames must be positive sizes, not {self.chunk_frames}")
        if self.overlap_mel < 1 or self.left_context_mel < 0:
            raise ValueError("overlap_mel must be >= 1 and left_context_mel >= 0")
        if 2 * min(self.chunk_frames) < self.overlap_mel:
            raise ValueError(f"every chunk ({2 * min(self.chunk_frames)} mel frames at least) must be as long as "
                             f"the overlap ({self.overlap_mel})")

    def chunk_size(self, index: int) -> int:
        return self.chunk_frames[min(index, len(self.chunk_frames) - 1)]


@dataclass(frozen=True, eq=False)
class PromptState:
    """The flow's state after the prompt's text-independent frames (see the module docstring).

    encoder: after the first Tp - held frames (None when the prompt has no more than ``held``);
    kv: per Euler step, per DiT block (keys, values) [2, H, Mh, Dh] (None: empty);
    conv: per step, per block the causal-conv tails (None: zeros); tail_*: the held-back frames'
    tokens [held, 2], aligned mel [1, C, 2·held] and noise [1, C, 2·held]; spks: [1, C].
    """

    n_steps: int
    spks: torch.Tensor
    encoder: EncoderCache | None
    kv: tuple | None
    conv: tuple | None
    tail_tokens: torch.Tensor
    tail_cond: torch.Tensor
    tail_noise: torch.Tensor
    prompt_mel_frames: int
    nbytes: int = 0


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_nbytes(o) for o in obj)
    if isinstance(obj, EncoderCache):
        return _nbytes((obj.pre, obj.kv1, obj.up, obj.kv2))
    return 0


def _fades(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Complementary (fade_out, fade_in) of length n; fade_in starts at exactly 0."""
    fade_in = np.sin(0.5 * np.pi * np.arange(n) / n) ** 2
    return (1.0 - fade_in).astype(np.float32), fade_in.astype(np.float32)


class VocoderStream:
    """HiFT over a stream of mel chunks, with mel overlap, cross-fade and a carried source phase.

    Parameters:
        hift: the decoder's ``HiFTGenerator``.
        overlap_mel: frames of the previous chunk re-vocoded with each new one.
        draw: ``draw(samples) -> SourceDraws`` for one call of ``samples`` samples.
    """

    def __init__(self, hift, overlap_mel: int, draw: Callable[[int], SourceDraws]) -> None:
        self.hift = hift
        self.overlap = overlap_mel
        self.upsample = hift.cfg.upsample_scale
        self.draw = draw
        self._tail_mel: torch.Tensor | None = None     # [1, C, o] last frames of the previous chunk
        self._context: torch.Tensor | None = None      # the F0 predictor's frames before _tail_mel
        self._held: np.ndarray | None = None          # their samples, not yet emitted
        self._phase: torch.Tensor | None = None
        self.frames_in = 0
        self.samples_out = 0

    def push(self, mel: torch.Tensor, last: bool = False) -> np.ndarray:
        """Vocode ``mel`` [1, C, m] float32; returns the samples that are final (all with ``last``)."""
        m = mel.size(2)
        if not last and m < self.overlap:
            raise ValueError(f"a non-final chunk of {m} mel frames is shorter than the overlap {self.overlap}")
        self.frames_in += m
        full = mel if self._tail_mel is None else torch.cat([self._tail_mel.to(mel), mel], dim=2)
        prev = 0 if self._tail_mel is None else self._tail_mel.size(2)
        keep = 0 if last else self.overlap
        frames = full.size(2)
        wav, self._phase = self.hift.stream_step(full, self.draw(frames * self.upsample), self._phase, frames - keep,
                                                 self._context)
        wav = wav[0].to(device="cpu", dtype=torch.float32).numpy()
        if prev:
            n = prev * self.upsample
            fade_out, fade_in = _fades(n)
            wav = np.concatenate([self._held * fade_out + wav[:n] * fade_in, wav[n:]])
        if keep:
            self._tail_mel = full[:, :, -keep:]
            before = full[:, :, :-keep]
            self._context = before[:, :, -self.hift.f0_context:] if before.size(2) else None
            self._held = wav[-keep * self.upsample:].copy()
            wav = wav[:-keep * self.upsample]
        else:
            self._tail_mel, self._held = None, None
        self.samples_out += wav.size
        return np.ascontiguousarray(wav, dtype=np.float32)


class _StepPast:
    """The attention context of one chunk, per Euler step: per block the list of (keys, values)
    segments (prompt, held-back prompt frames, recent frames). Nothing is joined here: the
    attention joins the segments with the chunk's own keys in its one copy, so the prompt's
    shared keys are never copied into a per-chunk tensor first."""

    def __init__(self, parts: list) -> None:
        self.parts = parts

    def __getitem__(self, step: int) -> list:
        blocks = len(self.parts[0][step])
        return [[p[step][b] for p in self.parts] for b in range(blocks)]


class DecodeSession:
    """One stream: ``push`` mixed ids as they come, iterate ``drain()`` for finished audio chunks,
    then ``drain(final=True)`` once the ids are complete. Not thread-safe (one consumer).

    Parameters:
        decoder: the :class:`StreamingDecoder`.
        state: the voice's :class:`PromptState`.
        seed: seeds the session's generator (flow noise, then vocoder draws).
        noise: [1, C, >= M_gen] flow noise of the generated frames to use instead of drawing it (tests).
        vocoder_draw: replaces the vocoder's source draws (tests).
        timer: gets stages ``decoder_encoder``, ``decoder_flow``, ``decoder_vocoder``.
    """

    def __init__(self, decoder: StreamingDecoder, state: PromptState, seed: int, *,
                 noise: torch.Tensor | None = None, vocoder_draw: Callable[[int], SourceDraws] | None = None,
                 timer: Timer | None = None) -> None:
        self.decoder, self.state = decoder, state
        self.config = decoder.config
        base = decoder.base
        self.generator = torch.Generator(device="cpu").manual_seed(int(seed))
        self._noise = noise
        self.timer = timer or Timer()
        vocoder_generator = base._vocoder_generator(self.generator)
        harmonics = base.hift.cfg.nb_harmonics + 1
        draw = vocoder_draw or (lambda samples: draw_source_noise(1, samples, harmonics, device=base.device,
                                                                  generator=vocoder_generator))
        self.vocoder = VocoderStream(base.hift, self.config.overlap_mel, draw)
        self._ids: list[int] = []          # mixed ids of an incomplete group
        self._frames: list[torch.Tensor] = []
        self._pending = 0                  # token frames waiting in _frames
        self.frames_received = 0
        self._encoder = state.encoder
        self._conv = state.conv
        self._tail_kv: list | None = None  # per step, per block: the held-back prompt frames' keys/values
        self._recent_kv: list | None = None
        self.chunks = 0                    # chunks decoded so far
        self.mel_frames = 0                # generated mel frames decoded so far
        self.closed = False

    # ------------------------------------------------------------------ input
    def push(self, ids: Sequence[int]) -> None:
        """Add mixed ids (0..5119, groups [vq02, vq02, vq06, vq06, vq06]); whole groups become frames.

        Raises:
            InputError: an id is out of range or in the wrong slot (as ``core.audio_tokens.check_mixed``).
        """
        self._ids.extend(int(i) for i in ids)
        whole = len(self._ids) - len(self._ids) % GROUP
        if whole:
            self._add_frames(self._ids[:whole])
            del self._ids[:whole]

    def _add_frames(self, mixed: list[int]) -> None:
        frames = reshape_mixed_tokens(check_mixed(mixed, "streamed tokens"))
        self.frames_received += frames.size(0)
        if self.state.prompt_mel_frames + 2 * self.frames_received > MAX_MEL_FRAMES:
            raise InputError(f"prompt plus output would be more than {MAX_MEL_FRAMES / 50:.0f} s; the decoder "
                             "supports no more in one stream")
        self._frames.append(frames)
        self._pending += frames.size(0)

    # ------------------------------------------------------------------ output
    def drain(self, final: bool = False) -> Iterator[np.ndarray]:
        """Decode every chunk whose frames (and look-ahead) have arrived; yields waveform pieces.

        With ``final`` the ids are complete: a ragged last group is padded as ``token2wav`` does
        and the rest is decoded as the last chunk (the look-ahead is zeros, as at the end of a
        non-streamed decode).
        """
        look = self.decoder.lookahead
        while not self.closed:
            size = self.config.chunk_size(self.chunks)
            if self._pending >= size + look:
                yield self._decode(size, last=False)
            elif final:
                if self._ids:
                    self._add_frames(list(self._ids))
                    self._ids.clear()
                if self._pending:
                    yield self._decode(self._pending, last=True)
                self.closed = True
            else:
                return

    def _take(self, n: int, look: int) -> torch.Tensor:
        """The next n frames plus ``look`` look-ahead frames (those stay pending)."""
        frames = torch.cat(self._frames) if len(self._frames) > 1 else self._frames[0]
        out = frames[: n + look]
        rest = frames[n:]
        self._frames = [rest] if rest.size(0) else []
        self._pending -= n
        return out

    @torch.inference_mode()
    def _decode(self, n: int, last: bool) -> np.ndarray:
        base, state = self.decoder.base, self.state
        flow = base.flow
        look = 0 if last else self.decoder.lookahead
        tokens = self._take(n, look)
        first = self.chunks == 0
        held = state.tail_tokens.size(0) if first else 0
        if held:
            tokens = torch.cat([state.tail_tokens, tokens])
        m = 2 * n
        to_flow = dict(device=base.device, dtype=base.dtype)
        sync = self.decoder.sync
        with self.timer.stage("decoder_encoder"):
            emb = flow.input_embedding(tokens.unsqueeze(0).to(base.device))
            h, self._encoder = flow.encoder.forward_chunk(emb, self._encoder, last=last)
            mu = flow.encoder_proj(h).transpose(1, 2).contiguous()               # [1, C, 2·held + m]
            sync()
        with self.timer.stage("decoder_flow"):
            noise = self._gen_noise(m)
            cond = torch.zeros_like(mu)
            if held:
                noise = torch.cat([state.tail_noise, noise], dim=2)
                cond[:, :, :2 * held] = state.tail_cond.to(**to_flow)
            past = self._past()
            x, kv, self._conv = self.decoder.solve(noise.to(base.device, torch.float32), mu, state.spks, cond,
                                                   state.n_steps, past, self._conv)
            self._keep(kv, 2 * held)
            mel = x[:, :, 2 * held:].float()
            sync()
        with self.timer.stage("decoder_vocoder"):
            wav = self.vocoder.push(mel, last=last)
            sync()
        self.chunks += 1
        self.mel_frames += m
        if not np.isfinite(wav).all():
            from core.errors import ModelError
            raise ModelError("the vocoder produced non-finite values in a streamed chunk")
        return wav

    def _gen_noise(self, m: int) -> torch.Tensor:
        c = self.decoder.base.config.flow.output_size
        if self._noise is not None:
            start = self.mel_frames
            if self._noise.size(2) < start + m:
                raise InputError(f"injected noise has {self._noise.size(2)} frames; the stream needs {start + m}")
            return self._noise[:, :, start:start + m].float()
        # Time-major, so that a chunk's noise does not depend on how long the stream will be.
        return torch.randn(m, c, generator=self.generator).T.unsqueeze(0).contiguous()

    def _past(self) -> _StepPast | None:
        """Per step, per block: the keys/values this chunk may attend to (prompt + kept frames)."""
        parts = [p for p in (self.state.kv, self._tail_kv, self._recent_kv) if p is not None]
        return _StepPast(parts) if parts else None

    def _keep(self, kv: list, held_mel: int) -> None:
        """Keep the held-back prompt frames for good, and the last ``left_context_mel`` generated ones."""
        left = self.config.left_context_mel
        if held_mel:
            self._tail_kv = [[(k[:, :, :held_mel], v[:, :, :held_mel]) for k, v in step] for step in kv]
        if not left:
            self._recent_kv = None
            return
        new = [[(k[:, :, held_mel:], v[:, :, held_mel:]) for k, v in step] for step in kv]
        # A chunk at least as long as the left context replaces it outright (no join with the old).
        if self._recent_kv is not None and new[0][0][0].size(2) < left:
            new = [[(torch.cat([ok, k], dim=2), torch.cat([ov, v], dim=2)) for (ok, ov), (k, v) in zip(old, step)]
                   for old, step in zip(self._recent_kv, new)]
        start = max(0, new[0][0][0].size(2) - left)
        self._recent_kv = [[(k[:, :, start:].contiguous(), v[:, :, start:].contiguous()) for k, v in step]
                           for step in new]

    def close(self) -> None:
        """Drop the session's caches (the prompt state stays with the decoder)."""
        self.closed = True
        self._frames, self._tail_kv, self._recent_kv, self._encoder, self._conv = [], None, None, None, None


class StreamingDecoder:
    """Streams for one :class:`AudioDecoder`; thread-safe (each session is one consumer's).

    Parameters:
        base: the loaded decoder (its flow, vocoder, device and dtype).
        config: the chunk schedule.
        prompt_cache_bytes: budget of the prompt-state LRU (0: states are not kept).
    """

    def __init__(self, base: AudioDecoder, config: StreamConfig = StreamConfig(),
                 prompt_cache_bytes: int = 1 << 30) -> None:
        self.base = base
        self.config = config
        self.lookahead = base.flow.cfg.encoder.pre_lookahead_len
        self.prompt_cache_bytes = int(prompt_cache_bytes)
        self._states: collections.OrderedDict = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._building: dict = {}
        self.hits = 0
        self.misses = 0
        self._conditioning: dict = {}      # n_steps -> per step the DiT's TimeConditioning (t-only terms)
        self.sync = (lambda: torch.cuda.synchronize(base.device)) if base.device.type == "cuda" else (lambda: None)

    # ------------------------------------------------------------------ prompt states
    def prompt_state(self, key, prompt_tokens, prompt_mel, speaker_embedding, n_steps: int | None = None,
                     timer: Timer | None = None) -> PromptState:
        """The voice's :class:`PromptState`, from the LRU when ``key`` (e.g. the prompt digest) was
        seen with the same step count, else computed (once, even when requested concurrently).

        Raises:
            InputError: bad prompt ids or arrays (as ``AudioDecoder.token2wav``), n_steps < 1.
        """
        steps = self.base.n_steps if n_steps is None else int(n_steps)
        if steps < 1:
            raise InputError(f"n_steps must be at least 1, not {steps}")
        full_key = (key, steps)
        timer = timer or Timer()
        with self._lock:
            state = self._states.get(full_key)
            if state is not None:
                self._states.move_to_end(full_key)
                self.hits += 1
                timer.record("stream_prompt_state", 0.0, cached=True)
                return state
            gate = self._building.setdefault(full_key, threading.Lock())
        with gate:
            with self._lock:
                state = self._states.get(full_key)
                if state is not None:
                    self.hits += 1
                    timer.record("stream_prompt_state", 0.0, cached=True)
                    return state
            with timer.stage("stream_prompt_state"):
                state = self.build_prompt_state(prompt_tokens, prompt_mel, speaker_embedding, steps)
            with self._lock:
                self.misses += 1
                self._building.pop(full_key, None)
                if state.nbytes <= self.prompt_cache_bytes:
                    self._states[full_key] = state
                    self._bytes += state.nbytes
                    while self._bytes > self.prompt_cache_bytes and self._states:
                        _, old = self._states.popitem(last=False)
                        self._bytes -= old.nbytes
            return state

    def stats(self) -> dict:
        with self._lock:
            return {"states": len(self._states), "bytes": self._bytes, "hits": self.hits, "misses": self.misses}

    @torch.inference_mode()
    def build_prompt_state(self, prompt_tokens, prompt_mel, speaker_embedding, n_steps: int) -> PromptState:
        """Compute a :class:`PromptState` (no caching; see :meth:`prompt_state`)."""
        base = self.base
        flow, cfg = base.flow, base.config.flow
        prompt = reshape_mixed_tokens(check_mixed(prompt_tokens, "prompt_tokens"))
        mel = _as_float_tensor(prompt_mel, "[T, 80]", "prompt_mel")
        if mel.ndim == 3 and mel.size(0) == 1:
            mel = mel[0]
        if mel.ndim != 2 or mel.size(1) != cfg.output_size or mel.size(0) == 0:
            raise InputError(f"prompt_mel must have shape [T, {cfg.output_size}] with T > 0, got {tuple(mel.shape)}")
        emb = _as_float_tensor(speaker_embedding, "[192]", "speaker_embedding").reshape(1, -1)
        if emb.size(1) != cfg.spk_embed_dim or not emb.abs().sum() > 0:
            raise InputError(f"speaker_embedding must have {cfg.spk_embed_dim} values, not all zero")
        to_flow = dict(device=base.device, dtype=base.dtype)
        tp = prompt.size(0)
        m_prompt = 2 * tp
        if m_prompt > MAX_MEL_FRAMES:
            raise InputError(f"the prompt is {m_prompt / 50:.1f} s; the decoder supports at most "
                             f"{MAX_MEL_FRAMES / 50:.0f} s")
        held = min(self.lookahead, tp)
        head = tp - held
        spks = flow.project_speaker(bf16_round(emb).to(**to_flow))
        cond = align_prompt_mel(bf16_round(mel), m_prompt).transpose(1, 2).contiguous()   # [1, C, Mp] float32
        noise = torch.randn(m_prompt, cfg.output_size,
                            generator=torch.Generator().manual_seed(PROMPT_NOISE_SEED)).T.unsqueeze(0).contiguous()
        encoder = kv = conv = None
        if head:
            h, encoder = flow.encoder.forward_chunk(flow.input_embedding(prompt.unsqueeze(0).to(base.device)), None)
            mu = flow.encoder_proj(h).transpose(1, 2).contiguous()
            _, kv, conv = self.solve(noise[:, :, :2 * head].to(base.device), mu, spks,
                                     cond[:, :, :2 * head].to(**to_flow), n_steps, None, None)
            kv = tuple(tuple((k.contiguous(), v.contiguous()) for k, v in step) for step in kv)
            conv = tuple(tuple(step) for step in conv)
        state = PromptState(n_steps=n_steps, spks=spks, encoder=encoder, kv=kv, conv=conv,
                            tail_tokens=prompt[head:], tail_cond=cond[:, :, 2 * head:], tail_noise=noise[:, :, 2 * head:],
                            prompt_mel_frames=m_prompt)
        object.__setattr__(state, "nbytes", _nbytes((spks, kv, conv)) + _nbytes(encoder))
        return state

    # ------------------------------------------------------------------ flow
    def _time_steps(self, n_steps: int) -> tuple[list, list]:
        """The Euler times and increments, accumulated exactly as ``ConditionalCFM.forward`` does."""
        t_span = cosine_t_span(n_steps, device=self.base.device, dtype=torch.float32)
        t, dt = t_span[0:1], t_span[1] - t_span[0]
        times, steps = [], []
        for step in range(1, n_steps + 1):
            times.append(t)
            steps.append(dt)
            t = t + dt
            if step < n_steps:
                dt = t_span[step + 1] - t
        return times, steps

    @torch.inference_mode()
    def time_conditioning(self, n_steps: int) -> tuple:
        """Per Euler step, the DiT's terms that depend on the time alone (``DiT.time_conditioning``,
        guidance batch of 2). The same for every chunk of every stream, so computed once per step
        count (a few MB: 2 x 9 x 512 values per block and step)."""
        with self._lock:
            cached = self._conditioning.get(n_steps)
        if cached is None:
            estimator = self.base.flow.decoder.estimator
            times, _ = self._time_steps(n_steps)
            cached = tuple(estimator.time_conditioning(torch.cat([t, t], dim=0)) for t in times)
            with self._lock:
                cached = self._conditioning.setdefault(n_steps, cached)
        return cached

    def solve(self, z: torch.Tensor, mu: torch.Tensor, spks: torch.Tensor, cond: torch.Tensor, n_steps: int,
              past: list | None, conv: list | tuple | None) -> tuple[torch.Tensor, list, list]:
        """The Euler solve of one chunk (as ``ConditionalCFM.forward``, guidance included), with caches.

        z [1, C, m] float32 noise; mu, cond [1, C, m] and spks [1, C] in the flow's dtype; past /
        conv per step as ``DiT.forward_cached`` takes them. Returns (x [1, C, m] float32, per step
        the chunk's keys/values, per step the new conv caches).
        """
        decoder = self.base.flow.decoder
        estimator, r = decoder.estimator, decoder.inference_cfg_rate
        dtype = mu.dtype
        _, increments = self._time_steps(n_steps)
        conditioning = self.time_conditioning(n_steps)
        mu_in = torch.cat([mu, torch.zeros_like(mu)], dim=0)
        spks_in = torch.cat([spks, torch.zeros_like(spks)], dim=0)
        cond_in = torch.cat([cond, torch.zeros_like(cond)], dim=0)
        x = z.float()
        all_kv, all_conv = [], []
        for step in range(n_steps):
            x_in = torch.cat([x, x], dim=0).to(dtype)
            v, kv, new_conv = estimator.forward_cached(x_in, mu_in, None, spks_in, cond_in,
                                                       past[step] if past else None,
                                                       conv[step] if conv else None, conditioning[step])
            all_kv.append(kv)
            all_conv.append(new_conv)
            v_cond, v_uncond = v.float().chunk(2, dim=0)
            x = x + increments[step] * ((1.0 + r) * v_cond - r * v_uncond)
        return x, all_kv, all_conv

    # ------------------------------------------------------------------ sessions
    def open(self, state: PromptState, seed: int, **kwargs) -> DecodeSession:
        """A new :class:`DecodeSession` for ``state`` (see its parameters)."""
        return DecodeSession(self, state, seed, **kwargs)

    def stream(self, tokens: Sequence[int], state: PromptState, seed: int, group_batch: int = 1,
               **kwargs) -> Iterator[np.ndarray]:
        """Decode a complete id list as a stream (fed ``group_batch`` groups at a time): tests, benches."""
        session = self.open(state, seed, **kwargs)
        step = GROUP * group_batch
        for i in range(0, len(tokens), step):
            session.push(tokens[i:i + step])
            yield from session.drain()
        yield from session.drain(final=True)
