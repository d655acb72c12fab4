"""The Step-Audio engine's streaming path: LLM ids as they are sampled -> decoder chunks -> Audio.

Owns: ``AudioIdFilter`` (the slot filter of ``llm.sampling.filter_audio_ids``, one id at a time),
``SeamFader`` (the streaming form of ``llm.longform.crossfade_join``: same seams, same length) and
``stream_answers`` (the producer behind ``StepAudioEngine.clone_stream`` / ``edit_stream``).
Does not own: prompts and validation (``tts_engine/step_audio.py``), the LLM (any ``LLMBackend``), the
chunked decoder (``decoder/streaming.py``), the stream handle (``tts_engine/contract.py``).

Only the ``LLMBackend`` / ``GenerationStream`` contract is used, so the backend behind it (the
``llm.native``, ``llm.vllm_backend``) can change without touching this file.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator, Sequence

import numpy as np

from core.audio_io import Audio
from core.audio_tokens import AUDIO_ID_END, AUDIO_ID_OFFSET, GROUP, VQ02_CODES
from core.errors import ModelError, StudioError
from core.timings import Timer
from llm.backend import GenerationCancelled, GenerationRequest, GenerationStream, LLMBackend
from tts_engine.contract import CancelToken, CloneOptions, Result

log = logging.getLogger(__name__)

_VQ02_END = AUDIO_ID_OFFSET + VQ02_CODES
_VQ02_SLOTS = 2


class AudioIdFilter:
    """Keeps the LLM ids that form whole ``[vq02, vq02, vq06, vq06, vq06]`` groups, as they come.

    ``push(id)`` returns the group it completes (LLM ids), else ``[]``; ids after an end-of-answer id
    are ignored. Same rule as ``filter_audio_ids``: non-audio ids and ids of the wrong kind for the
    next slot are dropped; a trailing partial group is never returned.
    """

    def __init__(self, eos_ids: Sequence[int]) -> None:
        self.eos = frozenset(int(i) for i in eos_ids)
        self._group: list[int] = []
        self.seen = 0
        self.kept = 0
        self.ended = False

    def push(self, token_id: int) -> list[int]:
        if self.ended:
            return []
        t = int(token_id)
        if t in self.eos:
            self.ended = True
            return []
        self.seen += 1
        if not AUDIO_ID_OFFSET <= t < AUDIO_ID_END:
            return []
        if (len(self._group) < _VQ02_SLOTS) != (t < _VQ02_END):
            return []
        self._group.append(t)
        if len(self._group) < GROUP:
            return []
        group, self._group = self._group, []
        self.kept += GROUP
        return group

    @property
    def dropped(self) -> int:
        return self.seen - self.kept


class SeamFader:
    """Joins the audio of consecutive text chunks with the equal-power cross-fade of
    ``crossfade_join`` while streaming: the last ``fade`` samples are always held back, so that a
    following piece can fade in over them. ``push`` returns final samples; ``end_piece()`` marks a
    seam (and returns what became final); ``finish()`` flushes. A piece's first ``fade`` samples
    are gathered before its seam is mixed, so short pieces fade exactly as ``crossfade_join`` does."""

    def __init__(self, sample_rate: int, fade_ms: float) -> None:
        self.fade = int(round(sample_rate * fade_ms / 1000.0))
        self._tail = _EMPTY
        self._seam: np.ndarray | None = None   # the previous piece's held-back end
        self._head = _EMPTY                    # this piece's first samples, until there are ``fade``

    def push(self, wav: np.ndarray) -> np.ndarray:
        wav = np.asarray(wav, dtype=np.float32)
        if self._seam is not None:
            self._head = np.concatenate([self._head, wav])
            if self._head.size < self.fade:
                return _EMPTY
            wav = self._mix()
        return self._hold(np.concatenate([self._tail, wav]))

    def end_piece(self) -> np.ndarray:
        buffer = np.concatenate([self._tail, self._mix()]) if self._seam is not None else self._tail
        keep = min(self.fade, buffer.size)
        self._seam, self._tail = buffer[buffer.size - keep:].copy(), _EMPTY
        return buffer[:buffer.size - keep]

    def finish(self) -> np.ndarray:
        out = np.concatenate([self._tail, self._mix()]) if self._seam is not None else self._tail
        self._tail = _EMPTY
        return out.astype(np.float32)

    def _hold(self, buffer: np.ndarray) -> np.ndarray:
        keep = min(self.fade, buffer.size)
        self._tail = buffer[buffer.size - keep:].copy()
        return buffer[:buffer.size - keep]

    def _mix(self) -> np.ndarray:
        left, head = self._seam, self._head
        self._seam, self._head = None, _EMPTY
        n = min(left.size, head.size)
        if not n:
            return np.concatenate([left, head])
        t = (np.arange(n, dtype=np.float32) + 0.5) / n
        seam = left[left.size - n:] * np.cos(t * np.pi / 2) + head[:n] * np.sin(t * np.pi / 2)
        return np.concatenate([left[:left.size - n], seam, head[n:]]).astype(np.float32)


_EMPTY = np.zeros(0, dtype=np.float32)


def stream_answers(*, backend: LLMBackend, streamer, prompts: list[list[int]], bundle, seed: int,
                   options: CloneOptions, timer: Timer, text: str, token: CancelToken, fade_ms: float,
                   on_done: Callable[[Result], None] = lambda result: None,
                   caps: Sequence[int | None] = ()) -> Generator[Audio, None, Result]:
    """Generate an answer per prompt (all submitted at once, so they batch), decode each as its ids
    arrive, join the text chunks' audio; yields ``Audio`` chunks, returns the whole ``Result``.

    Stages added to ``timer``: stream_prompt_state (``(hit)`` when cached), llm_wait (blocked on the
    LLM), token2wav (chunk decoding, with decoder_encoder / decoder_flow / decoder_vocoder inside),
    llm_prefill / llm_decode / llm_queue from the backend's outputs; counters ttfa_ms, llm_tokens,
    tokens_per_s, batch_size, chunks, stream_chunks.

    Raises:
        StreamCancelled: ``token`` was cancelled (every LLM request is cancelled too).
        ModelError: the LLM failed or answered without audio.
    """
    streamer_base = streamer.base
    rate = streamer_base.sample_rate
    chunk_seeds = [(seed + i) % 2**31 for i in range(len(prompts))]
    for stage in ("llm_queue", "llm_prefill", "llm_decode"):   # log them in pipeline order
        timer.record(stage, 0.0)
    streams: list[GenerationStream] = []
    try:
        for i, (ids, chunk_seed) in enumerate(zip(prompts, chunk_seeds)):   # caps: each answer's token cap
            cap = caps[i] if i < len(caps) else None
            streams.append(backend.submit(GenerationRequest(tuple(ids), chunk_seed, max_new_tokens=cap)))
    except BaseException:
        for s in streams:
            s.cancel()
        raise
    token.on_cancel(lambda: [s.cancel() for s in streams])
    state = streamer.prompt_state(bundle.digest, bundle.tokens.mixed, bundle.features.mel,
                                  bundle.features.embedding, n_steps=options.flow_steps, timer=timer)
    fader = SeamFader(rate, fade_ms)
    emitted: list[np.ndarray] = []
    all_ids: list[int] = []
    outputs = []
    sessions = []

    def emit(samples: np.ndarray):
        if samples.size:
            if not emitted:
                timer.set_counter("ttfa_ms", timer.elapsed_ms())
            emitted.append(samples)
            return Audio(samples, rate)
        return None

    try:
        for index, (stream, chunk_seed) in enumerate(zip(streams, chunk_seeds)):
            session = streamer.open(state, chunk_seed, timer=timer)
            sessions.append(session)
            id_filter = AudioIdFilter(backend.eos_ids)
            ids = iter(stream)
            while True:
                waited = time.perf_counter()
                try:
                    llm_id = next(ids)
                except StopIteration:
                    timer.record("llm_wait", (time.perf_counter() - waited) * 1000.0)
                    break
                except StudioError:
                    raise
                except Exception as exc:  # backend failures (e.g. out of memory) become a ModelError
                    log.exception("LLM generation failed")
                    raise ModelError(f"the LLM failed: {exc}") from None
                timer.record("llm_wait", (time.perf_counter() - waited) * 1000.0)
                token.check()
                group = id_filter.push(llm_id)
                if not group:
                    continue
                all_ids.extend(group)
                session.push([t - AUDIO_ID_OFFSET for t in group])
                for audio in _decoded(session, fader, timer, token, final=False):
                    if (chunk := emit(audio)) is not None:
                        yield chunk
            token.check()
            try:
                outputs.append(stream.result(timeout=0))
            except GenerationCancelled:
                token.check()
                raise ModelError("the LLM request was cancelled by the server") from None
            if id_filter.dropped:
                log.warning("LLM answer: dropped %d of %d ids that were not audio or broke the 2:3 slot pattern",
                            id_filter.dropped, id_filter.seen)
            if not id_filter.kept:
                raise ModelError(f"the LLM answered without audio ({id_filter.seen} ids, none forming a whole "
                                 "group of audio tokens); try another seed or check the model folder")
            for audio in _decoded(session, fader, timer, token, final=True):
                if (chunk := emit(audio)) is not None:
                    yield chunk
            if index < len(streams) - 1 and (chunk := emit(fader.end_piece())) is not None:
                yield chunk
        if (chunk := emit(fader.finish())) is not None:
            yield chunk
    finally:
        for s in streams:
            if not s.done:
                s.cancel()
        for session in sessions:
            session.close()

    prefill = sum(o.prefill_ms for o in outputs)
    decode = sum(o.decode_ms for o in outputs)
    generated = sum(len(o.answer) for o in outputs)
    timer.record("llm_queue", sum(o.queue_ms for o in outputs))
    timer.record("llm_prefill", prefill)
    timer.record("llm_decode", decode)
    timer.set_counter("llm_tokens", generated)
    timer.set_counter("tokens_per_s", generated / (decode / 1000.0) if decode > 0 else 0.0)
    timer.set_counter("batch_size", max((o.batch_size for o in outputs), default=0))
    timer.set_counter("chunks", len(prompts))
    timer.set_counter("stream_chunks", sum(s.chunks for s in sessions))
    audio = Audio(np.concatenate(emitted) if emitted else np.zeros(0, np.float32), rate)
    timings = timer.finish(audio_seconds=audio.duration)
    result = Result(audio=audio, text=text, timings=timings, seed=seed, tokens=tuple(all_ids),
                    prompt_digest=bundle.digest)
    on_done(result)
    return result


def _decoded(session, fader: SeamFader, timer: Timer, token: CancelToken, final: bool):
    """Decode what the session can, chunk by chunk (checking for cancellation between chunks)."""
    pieces = session.drain(final=final)
    while True:
        token.check()
        start = time.perf_counter()
        try:
            wav = next(pieces)
        except StopIteration:
            timer.record("token2wav", (time.perf_counter() - start) * 1000.0)
            return
        timer.record("token2wav", (time.perf_counter() - start) * 1000.0)
        yield fader.push(wav)
