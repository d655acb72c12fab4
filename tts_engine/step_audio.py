"""The real engine: Step-Audio-EditX (tokenizer + Step1 LLM + CosyVoice decoder).

Owns: ``StepAudioEngine``, which runs prompt work through the cache, asks the LLM backend
(``self.llm_backend``, an :class:`llm.backend.LLMBackend`) for audio tokens, decodes them and times
every stage; ``clone_stream`` / ``edit_stream`` hand the same prompts to ``tts_engine/streaming.py``
(LLM backend stream -> chunked decoder).
Does not own: the contract (``tts_engine/contract.py``), choosing an engine (``tts_engine/select.py``), the
models themselves (``tokenizer/``, ``llm/``, ``decoder/``), audio formats, caching mechanics.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Mapping

import torch

from core.audio_io import Audio, AudioSource, load_audio
from core.audio_tokens import from_llm_ids
from core.devices import configure_tf32, numerics_class, resolve_device, resolve_dtype
from core.edit_options import EDIT_TYPES
from core.errors import ModelError, StudioError
from core.onnx_session import OnnxOptions
from core.settings import DECODER_SUBDIR, FUNASR_SUBDIR
from core.timings import StageTimings, Timer
from core.transcript import Transcript
from decoder.model import AudioDecoder
from decoder.streaming import StreamingDecoder
from funasr_cache.store import audio_digest
from llm.backend import GenerationCancelled, GenerationRequest, LLMBackend
from llm.longform import crossfade_join, split_text
from llm.native import NativeBackend, answer_rules
from llm.prompts import clone_prompt_ids, clone_speaker_id, edit_instruction, edit_prompt_ids
from llm.sampling import audio_answer
from llm.step1 import Step1Config
from llm.vllm_backend import create_vllm_backend
from tokenizer.asr import Transcriber
from tokenizer.step_audio import StepAudioTokenizer
from tts_engine.contract import CloneOptions, EditCapability, Engine, EngineInfo, ProgressFn, PromptReport, Result, ResultStream, answer_cap, new_seed, no_progress, request_cancel_token, validate_edit, validate_text
from tts_engine.prompt_bundle import PromptBundler, features_namespace
from tts_engine.streaming import stream_answers

log = logging.getLogger(__name__)


CROSSFADE_MS = 30.0          # seam between long-text chunks
_TYPES_NEEDING_AUDIO_TEXT = ("emotion", "style", "speed", "paralinguistic")


class StepAudioEngine(Engine):
    """Step-Audio-EditX: tokenizer + LLM + CosyVoice decoder, cache-first prompts, batched LLM calls.

    Thread-safe: requests keep their state in locals; the tokenizer, decoder and cache are
    thread-safe; every LLM request goes to one backend (by default :class:`llm.native.NativeBackend`,
    whose worker batches requests continuously: up to ``settings.llm_max_rows`` decode together and
    each leaves the batch as soon as it is done).

    Parameters:
        settings: model paths, device/dtype/tf32, limits, batching, flow steps.
        cache: the prompt cache shared with the tokenizer.

    Raises:
        ModelError: a model folder is incomplete or does not load.
    """

    def __init__(self, settings, cache) -> None:
        started = time.perf_counter()
        self.settings = settings
        self._cache = cache
        try:
            self.device = resolve_device(settings.device)
            self.dtype = resolve_dtype(settings.dtype, self.device)
        except ValueError as exc:
            raise ModelError(str(exc)) from None
        configure_tf32(settings.tf32)
        decoder_dir = settings.editx_dir / DECODER_SUBDIR
        onnx_options = OnnxOptions.from_settings(settings, use_cuda=self.device.type == "cuda")
        self.tokenizer = StepAudioTokenizer.load(settings.tokenizer_dir, onnx_options, self.device,
                                                 settings.vq02_encoder)
        self.decoder = AudioDecoder.from_dir(decoder_dir, self.device, self.dtype, onnx_options,
                                             n_steps=settings.flow_steps)
        self.llm_backend = _create_llm_backend(settings, self.device, self.dtype)
        self.bundler = PromptBundler(self.tokenizer, self.decoder.frontend, cache, features_namespace(decoder_dir, cache.root),
                                     numerics_class(self.device, settings.tf32))
        self.streamer = StreamingDecoder(self.decoder, prompt_cache_bytes=settings.stream_prompt_cache_mb * 2**20)
        self._capabilities = tuple(EditCapability(t, opts) for t, opts in EDIT_TYPES.items())
        # The tokenizer folder's full Paraformer, loaded on the first transcription only.
        self.transcriber = Transcriber(settings.tokenizer_dir / FUNASR_SUBDIR, self.device, settings.max_prompt_seconds)
        log.info("Step-Audio-EditX engine ready in %.1f s on %s (%s); LLM: %s",
                 time.perf_counter() - started, self.device, str(self.dtype).replace("torch.", ""),
                 self.llm_backend.describe())

    # -------------------------------------------------------------- interface

    def describe(self) -> EngineInfo:
        dtype = str(self.dtype).replace("torch.", "")
        return EngineInfo(name="Step-Audio-EditX", preview=False, device=f"{self.device} ({dtype})",
                          detail=f"LLM: {self.llm_backend.describe()} from {self.settings.editx_dir}; "
                                 f"CosyVoice decoder, {self.decoder.n_steps} flow steps")

    def capabilities(self) -> tuple[EditCapability, ...]:
        return self._capabilities

    @property
    def cache(self):
        return self._cache

    def prompt_namespaces(self) -> Mapping[str, str]:
        return self.bundler.namespaces

    def ready(self) -> tuple[bool, str]:
        if self.device.type == "cuda" and not torch.cuda.is_available():
            return False, f"{self.device} is not available"
        llm_ok, why = self.llm_backend.ready()
        if not llm_ok:
            return False, f"LLM ({self.llm_backend.name}): {why}"
        return True, f"ok ({self.device})"

    def close(self) -> None:
        self.llm_backend.close()

    def transcribe(self, audio: AudioSource) -> Transcript:
        return self.transcriber.transcribe(audio)

    def prepare_prompt(self, prompt_audio: AudioSource) -> PromptReport:
        timer = Timer()
        audio, digest = self._decode(prompt_audio, timer)
        _, hits = self.bundler.bundle(audio, digest, timer)
        kinds = frozenset(self.bundler.namespaces)
        return PromptReport(digest=digest, hits=hits, misses=kinds - hits, timings=timer.finish(),
                            namespaces=self.bundler.namespaces)

    def clone(self, prompt_audio: AudioSource, prompt_text: str, target_text: str, *, seed: int | None = None,
              options: CloneOptions = CloneOptions(), progress: ProgressFn = no_progress) -> Result:
        seed, timer = new_seed(seed), Timer()
        prompts, bundle, caps = self._clone_prompts(prompt_audio, prompt_text, target_text, timer, progress)
        return self._generate("clone", prompts, bundle, seed, options, progress, timer, target_text, caps)

    def clone_stream(self, prompt_audio: AudioSource, prompt_text: str, target_text: str, *,
                     seed: int | None = None, options: CloneOptions = CloneOptions()) -> ResultStream:
        seed = new_seed(seed)

        def produce(token):
            timer = Timer()
            prompts, bundle, caps = self._clone_prompts(prompt_audio, prompt_text, target_text, timer, no_progress)
            return (yield from self._stream("clone", prompts, bundle, seed, options, timer, target_text, token, caps))

        return ResultStream(produce, seed, self.decoder.sample_rate)

    def _clone_prompts(self, prompt_audio: AudioSource, prompt_text: str, target_text: str, timer,
                       progress: ProgressFn):
        """Validate a clone request, fetch its prompt bundle; (LLM prompts, one per text chunk; bundle;
        each prompt's answer cap)."""
        limit = self.settings.max_text_chars
        prompt_text = validate_text(prompt_text, "the prompt text (what the prompt clip says)", limit)
        target_text = validate_text(target_text, "the target text", limit)
        progress(0.0, "preparing the prompt clip")
        audio, digest = self._decode(prompt_audio, timer)
        bundle, _ = self.bundler.bundle(audio, digest, timer)
        chunks = split_text(target_text, self.settings.text_chunk_chars)
        with timer.stage("prompt_build"):
            speaker = clone_speaker_id(prompt_text, audio.as_loaded())   # the raw [C, N] array, as upstream
            prompts = [clone_prompt_ids(self.llm_backend.encode, speaker, prompt_text, bundle.tokens.audio_string, chunk)
                       for chunk in chunks]
        caps = [answer_cap(self.settings.llm_max_new_tokens, chunk) for chunk in chunks]
        return prompts, bundle, [self._within_context(cap, ids) for cap, ids in zip(caps, prompts)]

    def edit(self, audio: AudioSource, audio_text: str, edit_type: str, edit_info: str | None = None,
             text: str | None = None, *, seed: int | None = None, options: CloneOptions = CloneOptions(),
             progress: ProgressFn = no_progress) -> Result:
        seed, timer = new_seed(seed), Timer()
        prompts, bundle, spoken, caps = self._edit_prompts(audio, audio_text, edit_type, edit_info, text, timer,
                                                           progress)
        return self._generate(f"edit:{edit_type}", prompts, bundle, seed, options, progress, timer, spoken, caps)

    def edit_stream(self, audio: AudioSource, audio_text: str, edit_type: str, edit_info: str | None = None,
                    text: str | None = None, *, seed: int | None = None,
                    options: CloneOptions = CloneOptions()) -> ResultStream:
        seed = new_seed(seed)

        def produce(token):
            timer = Timer()
            prompts, bundle, spoken, caps = self._edit_prompts(audio, audio_text, edit_type, edit_info, text, timer,
                                                               no_progress)
            return (yield from self._stream(f"edit:{edit_type}", prompts, bundle, seed, options, timer, spoken,
                                            token, caps))

        return ResultStream(produce, seed, self.decoder.sample_rate)

    def _edit_prompts(self, audio: AudioSource, audio_text: str, edit_type: str, edit_info: str | None,
                      text: str | None, timer, progress: ProgressFn):
        """Validate an edit request, fetch its bundle; (LLM prompts, bundle, the text the result says, caps)."""
        edit_info = validate_edit(edit_type, edit_info, self._capabilities)
        limit = self.settings.max_text_chars
        if edit_type in _TYPES_NEEDING_AUDIO_TEXT:
            audio_text = validate_text(audio_text, f"the audio's text (needed for {edit_type} edits)", limit)
        elif audio_text and len(audio_text) > limit:
            validate_text(audio_text, "the audio's text", limit)
        if edit_type == "paralinguistic":
            text = validate_text(text, "the new text with tags such as [Laughter] (needed for paralinguistic edits)",
                                 limit)
        progress(0.0, "preparing the input clip")
        clip, digest = self._decode(audio, timer, what="the audio to edit")
        bundle, _ = self.bundler.bundle(clip, digest, timer)
        with timer.stage("prompt_build"):
            instruction = edit_instruction(edit_type, edit_info, audio_text, text)
            prompts = [edit_prompt_ids(self.llm_backend.encode, instruction, bundle.tokens.audio_string)]
        spoken = text if edit_type == "paralinguistic" else (audio_text or "")
        cap = answer_cap(self.settings.llm_max_new_tokens, text or "", clip.duration)
        return prompts, bundle, spoken, [self._within_context(cap, prompts[0])]

    def _within_context(self, cap: int, prompt: list[int]) -> int:
        """``cap`` lowered to the room the prompt leaves in the model's context (a vLLM server refuses a
        request whose prompt plus max_tokens exceeds it); a prompt with no room keeps ``cap`` and is
        refused by the backend with its own message."""
        sampling = getattr(self.llm_backend, "sampling", None)   # every backend here has one; a stub may not
        room = sampling.budget(len(prompt)) if sampling is not None else cap
        return min(cap, room) if room >= 1 else cap

    # -------------------------------------------------------------- steps

    def _decode(self, source: AudioSource, timer, what: str = "the prompt clip") -> tuple[Audio, str]:
        with timer.stage("decode_audio"):
            audio = load_audio(source, max_seconds=self.settings.max_prompt_seconds, what=what)
        with timer.stage("hash"):
            digest = audio_digest(audio.samples, audio.sample_rate)
        return audio, digest

    def _stream(self, kind: str, prompts: list[list[int]], bundle, seed: int, options: CloneOptions, timer,
                text: str, token, caps: list[int]):
        """The streaming form of :meth:`_generate` (``tts_engine/streaming.py``); yields Audio, returns the Result.
        The backend refuses a prompt that leaves no room for an answer (InputError) at the first chunk."""
        return (yield from stream_answers(backend=self.llm_backend, streamer=self.streamer, prompts=prompts,
                                          bundle=bundle, seed=seed, options=options, timer=timer, text=text,
                                          token=token, fade_ms=CROSSFADE_MS, caps=caps,
                                          on_done=lambda result: _log_request(kind, result.timings, bundle.digest)))

    def _generate(self, kind: str, prompts: list[list[int]], bundle, seed: int, options: CloneOptions,
                  progress: ProgressFn, timer, text: str, caps: list[int]) -> Result:
        """Generate one answer per prompt (chunks batch together), decode each, join; the Result.

        Raises:
            StreamCancelled: the request's cancel token (``request_cancel_token``) was cancelled.
        """
        n = len(prompts)
        chunk_seeds = [(seed + i) % 2**31 for i in range(n)]
        # Every chunk is submitted at once: they decode side by side while earlier ones are decoded to audio.
        streams, pieces, all_ids, outputs, generated, waited_ms = [], [], [], [], 0, 0.0
        for stage in ("llm_queue", "llm_prefill", "llm_decode"):   # log them in pipeline order
            timer.record(stage, 0.0)
        token = request_cancel_token()
        try:
            for ids, s, cap in zip(prompts, chunk_seeds, caps):
                streams.append(self.llm_backend.submit(GenerationRequest(tuple(ids), s, max_new_tokens=cap)))
            if token is not None:   # a client that went away (or a passed deadline) frees its LLM rows at once
                token.on_cancel(lambda: [s.cancel() for s in streams])
            for i, (stream, chunk_seed) in enumerate(zip(streams, chunk_seeds)):
                wait_start = time.perf_counter()
                try:
                    out = stream.result()
                except StudioError:
                    raise
                except GenerationCancelled:
                    if token is not None:
                        token.check()
                    raise ModelError("the LLM request was cancelled by the server") from None
                except Exception as exc:  # noqa: BLE001 -- torch failures (e.g. out of memory)
                    log.error("LLM generation failed: %s", exc)
                    raise ModelError(f"the LLM failed: {exc}") from None
                waited_ms += (time.perf_counter() - wait_start) * 1000.0
                outputs.append(out)
                generated += len(out.answer)
                ids = audio_answer(out.answer, self.llm_backend.eos_ids)
                if token is not None:
                    token.check()
                with timer.stage("token2wav"):
                    wav = self.decoder.token2wav(from_llm_ids(ids), bundle.tokens.mixed, bundle.features,
                                                 seed=chunk_seed, n_steps=options.flow_steps)
                pieces.append(wav.samples)
                rate = wav.sample_rate
                all_ids += ids
                progress((i + 1) / n, f"chunk {i + 1}/{n}" if n > 1 else "generated")
        finally:
            for stream in streams:     # a failed chunk or a failed decode: stop the others' rows
                stream.cancel()
        # Per row, summed over chunks (chunks run side by side, so for several chunks this can exceed the wait).
        prefill = sum(o.prefill_ms for o in outputs)
        decode = sum(o.decode_ms for o in outputs)
        timer.record("llm_queue", max(0.0, waited_ms - prefill - decode))
        timer.record("llm_prefill", prefill)
        timer.record("llm_decode", decode)
        timer.set_counter("llm_tokens", generated)
        timer.set_counter("tokens_per_s", generated / (decode / 1000.0) if decode > 0 else 0.0)
        timer.set_counter("batch_size", max(o.batch_size for o in outputs))
        timer.set_counter("chunks", n)
        with timer.stage("join"):
            samples = crossfade_join(pieces, rate, CROSSFADE_MS)
        result_audio = Audio(samples, rate)
        timings = timer.finish(audio_seconds=result_audio.duration)
        _log_request(kind, timings, bundle.digest)
        return Result(audio=result_audio, text=text, timings=timings, seed=seed, tokens=tuple(all_ids),
                      prompt_digest=bundle.digest)


def _log_request(kind: str, t: StageTimings, digest: str) -> None:
    """One summary block per request, at DEBUG: the one INFO line per request is the edge's ``timing``
    line (UI / HTTP), which knows the request id the client sees."""
    req = secrets.token_hex(2)
    ms = t.stages_ms
    prompt_ms = sum(v for k, v in ms.items() if k.startswith(("tokenize_", "prompt_mel", "speaker_embedding",
                                                               "cache_")))
    hit = "cache hit" if "cache_lookup" in t.cached else "computed"
    c = t.counters
    log.debug("%s req=%s\nTotal time: %.3f s (%.2f s of audio, RTF %.3f)\n"
              " - Load audio (decode + hash): %.1f ms\n"
              " - Prompt bundle %s (%s): %.1f ms\n"
              " - %s: prompt build %.1f ms, LLM queue %.1f ms, prefill %.1f ms, decode %.1f ms "
              "(%d tokens, %.1f tokens/s, batch %d, %d chunk(s)), token2wav %.1f ms",
              kind, req, t.total_ms / 1000.0, c.get("audio_s", 0.0), t.rtf,
              ms.get("decode_audio", 0.0) + ms.get("hash", 0.0), digest[:12], hit, prompt_ms,
              kind.capitalize(), ms.get("prompt_build", 0.0), ms.get("llm_queue", 0.0), ms.get("llm_prefill", 0.0),
              ms.get("llm_decode", 0.0), int(c.get("llm_tokens", 0)), c.get("tokens_per_s", 0.0),
              int(c.get("batch_size", 0)), int(c.get("chunks", 0)), ms.get("token2wav", 0.0))
    log.debug("%s", t.log_line(kind.split(":")[0], req))


def _create_llm_backend(settings, device: torch.device, dtype: torch.dtype) -> LLMBackend:
    """The LLM backend ``--llm-backend`` names: our Step1 loop, or vLLM (a shared server at ``--llm-url``
    or in this process). Both sample by the same rules, read from the same folder."""
    folder = settings.editx_dir
    if settings.llm_backend == "vllm":
        config = Step1Config.from_json(folder / "config.json")
        tokenizer, sampling, eos_ids = answer_rules(folder, config, max_new_tokens=settings.llm_max_new_tokens,
                                                    slot_mask=settings.llm_slot_mask)
        if settings.llm_quantization != "none":
            log.warning("--llm-quantization %s applies to the native backend only; vLLM ignores it (use vLLM's "
                        "own --quantization on its server)", settings.llm_quantization)
        return create_vllm_backend(settings, folder, tokenizer.encode, eos_ids, sampling)
    return NativeBackend.from_folder(folder, device, dtype, max_new_tokens=settings.llm_max_new_tokens,
                                     slot_mask=settings.llm_slot_mask, max_rows=settings.llm_max_rows,
                                     step_token_budget=settings.llm_step_token_budget,
                                     quantization=settings.llm_quantization)
