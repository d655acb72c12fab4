"""The engine contract: what the studio asks of an engine, and the value types that cross it.

Owns: the ``Engine`` interface (clone, edit, their streaming forms, repeated edits, transcription,
prompt preparation, capabilities, readiness, and copying a clip's prompt-cache entries out of and
into the cache for voice bundles), the frozen value types (``Result``, ``CloneOptions``,
``EngineInfo``, ``EditCapability``, ``PromptReport``, ``PromptEntry``, ``PromptImport``; ``Transcript``
is ``core.transcript``'s), the streaming handle (``ResultStream`` with its ``CancelToken``) and the request
validation every engine shares.

Streaming: ``clone_stream`` / ``edit_stream`` return a ``ResultStream`` at once; nothing runs until
the first ``next()``, which does the validation (so bad input raises there, before any audio) and
returns the first ``Audio`` chunk. Iteration ends with the whole ``Result`` in ``stream.result``
(all chunks joined; ``timings.counters["ttfa_ms"]`` is the time to the first chunk). ``cancel()``
may be called from any thread: the engine stops at its next step and frees its LLM slot, and
the next ``next()`` raises ``StreamCancelled``. Engines without a streaming path inherit a
default that yields the whole result as one chunk.
Does not own: any engine (``tts_engine/step_audio.py``, ``preview/``), nor choosing one
(``tts_engine/select.py``).
"""

from __future__ import annotations

import abc
import contextvars
import logging
import math
import secrets
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Generator, Iterator, Mapping

from core.audio_io import Audio, AudioSource
from core.edit_options import EDIT_TYPES
from core.errors import InputError
from core.timings import StageTimings
from core.transcript import Transcript
from funasr_cache.store import PromptEntry

log = logging.getLogger(__name__)
# progress(fraction in [0, 1], description)
ProgressFn = Callable[[float, str], None]

MAX_EDIT_ITERATIONS = 5   # upstream's --n-edit-iter; whispering typically needs 2 or more


# The LLM's audio tokens per second of speech: vq02 at 50/3 Hz plus vq06 at 25 Hz (= 41.7).
AUDIO_TOKENS_PER_SECOND = 42
# A generous bound on how long a text takes to say: 0.5 s per character is twice slow Mandarin
# (about 4 characters a second) and seven times English; the 5 s cover short texts and pauses.
SECONDS_PER_CHAR = 0.5
BASE_SECONDS = 5.0


def answer_cap(setting: int, text: str = "", clip_seconds: float = 0.0) -> int:
    """The most LLM tokens one answer may take: ``setting`` (``llm_max_new_tokens``) when it is set,
    else proportional to what is said -- ``text`` (a clone's chunk, a paralinguistic edit's new text)
    plus, for an edit, twice the clip (a slower edit stretches it). A model that never says "end"
    then stops after seconds of audio instead of the context's 8192 tokens (about 195 s)."""
    if setting > 0:
        return setting
    seconds = BASE_SECONDS + SECONDS_PER_CHAR * len(text) + 2.0 * clip_seconds
    return int(math.ceil(seconds * AUDIO_TOKENS_PER_SECOND))


def no_progress(fraction: float, description: str) -> None:
    """The default progress callback: ignores reports."""


@dataclass(frozen=True)
class EngineInfo:
    """What the banner says about the loaded engine."""

    name: str                 # e.g. "Step-Audio-EditX" or "Preview (eSpeak NG + WORLD)"
    preview: bool             # True for the CPU preview engine
    device: str               # e.g. "cuda:0 (bfloat16)" or "cpu"
    detail: str               # one line: what it is / how to get the real models
    sample_rate: int = 24000


@dataclass(frozen=True)
class EditCapability:
    """One edit type as this engine supports it."""

    edit_type: str
    options: tuple[str, ...]                   # all edit_info values of the type (may be empty)
    available: bool = True                     # False: the engine cannot do this type at all
    unavailable_options: tuple[str, ...] = ()  # options it cannot honour (shown greyed out)
    note: str = ""                             # why, or how it is done


@dataclass(frozen=True)
class CloneOptions:
    """Per-request knobs; None means the engine's configured default."""

    flow_steps: int | None = None

    def __post_init__(self) -> None:
        if self.flow_steps is not None and not 1 <= self.flow_steps <= 50:
            raise InputError(f"flow_steps must be between 1 and 50, not {self.flow_steps}")


@dataclass(frozen=True)
class Result:
    """One generated clip and how it was made."""

    audio: Audio                       # mono float32, 24 kHz
    text: str                          # what the audio says (the next edit's audio_text)
    timings: StageTimings
    seed: int
    tokens: tuple[int, ...] = ()       # LLM audio ids that were decoded (empty for the preview)
    prompt_digest: str = ""            # cache digest of the prompt clip

    @property
    def cache_hits(self) -> frozenset[str]:
        return self.timings.cached


@dataclass(frozen=True)
class PromptReport:
    """What preparing a prompt clip did: its digest, which kinds hit the cache, timings."""

    digest: str
    hits: frozenset[str]
    misses: frozenset[str]
    timings: StageTimings
    namespaces: Mapping[str, str] = field(default_factory=dict)  # kind -> cache namespace


@dataclass(frozen=True)
class PromptImport:
    """What :meth:`Engine.import_prompt` did: the preparation report and the kinds it stored."""

    report: PromptReport
    imported: frozenset[str]                   # kinds taken from the bundle into the cache
    added: tuple[tuple[str, str, str], ...] = ()   # (kind, namespace, digest) it stored


class StreamCancelled(Exception):
    """Raised by ``ResultStream.__next__`` once the stream was cancelled."""


class CancelToken:
    """Thread-safe cancellation flag with callbacks (e.g. ``GenerationStream.cancel``)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def on_cancel(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` when cancelled (at once if already cancelled)."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(callback)
                return
        callback()

    def cancel(self) -> None:
        with self._lock:
            if self._event.is_set():
                return
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def check(self) -> None:
        """Raise ``StreamCancelled`` when cancelled (engines call it between steps)."""
        if self._event.is_set():
            raise StreamCancelled("the stream was cancelled")


# The cancellation of the request being served, for the whole-result calls (clone, edit, ...): the
# web layer binds it around an engine call, and an engine checks it between steps (a disconnected
# client or a passed deadline stops the LLM rows it holds). Streams carry their own token instead.
_request_cancel: contextvars.ContextVar[CancelToken | None] = contextvars.ContextVar("engine_request_cancel",
                                                                                    default=None)


@contextmanager
def cancellable(token: CancelToken | None) -> Iterator[None]:
    """Run the block's engine calls under ``token`` (None: not cancellable)."""
    reset = _request_cancel.set(token)
    try:
        yield
    finally:
        _request_cancel.reset(reset)


def request_cancel_token() -> CancelToken | None:
    """The token bound by :func:`cancellable` for this thread's engine call, if any."""
    return _request_cancel.get()


# produce(token) -> a generator of Audio chunks whose return value is the whole Result
Producer = Callable[[CancelToken], Generator[Audio, None, Result]]


class ResultStream(Iterator[Audio]):
    """A clone or edit in progress: iterate for ``Audio`` chunks; then ``result`` holds the whole Result.

    Parameters:
        produce: the engine's generator function (see ``Producer``); it gets this stream's token.
        seed: the request's seed (known before any audio, e.g. for an ``X-Seed`` header).
        sample_rate: of every chunk.
    """

    def __init__(self, produce: Producer, seed: int, sample_rate: int) -> None:
        self.seed = seed
        self.sample_rate = sample_rate
        self.token = CancelToken()
        self._gen = produce(self.token)
        self._result: Result | None = None
        self.chunks = 0

    def __next__(self) -> Audio:
        if self._result is not None:
            raise StopIteration
        self.token.check()
        try:
            chunk = next(self._gen)
        except StopIteration as stop:
            if not isinstance(stop.value, Result):
                raise RuntimeError("a stream producer ended without a Result") from None
            self._result = stop.value
            raise StopIteration from None
        self.chunks += 1
        return chunk

    def cancel(self) -> None:
        """Stop the engine's work for this stream (any thread; idempotent)."""
        self.token.cancel()

    @property
    def cancelled(self) -> bool:
        return self.token.cancelled

    @property
    def done(self) -> bool:
        return self._result is not None

    @property
    def result(self) -> Result:
        """The whole Result once iteration has ended.

        Raises:
            RuntimeError: the stream has not finished (or was cancelled).
        """
        if self._result is None:
            raise RuntimeError("the stream has not finished")
        return self._result

    def close(self) -> None:
        """Cancel and release the producer (call from the consuming thread, not while it runs)."""
        self.cancel()
        try:
            self._gen.close()
        except ValueError:   # "generator already executing": another thread is inside it; cancel suffices
            pass


def whole_result_stream(run: Callable[[], Result], seed: int, sample_rate: int) -> ResultStream:
    """A stream of one chunk: ``run()`` once, its audio as the only chunk (ttfa_ms = total)."""

    def produce(token: CancelToken):
        result = run()
        token.check()
        counters = dict(result.timings.counters)
        counters.setdefault("ttfa_ms", result.timings.total_ms)
        timings = StageTimings(result.timings.stages_ms, result.timings.cached, counters, result.timings.total_ms)
        yield result.audio
        return Result(audio=result.audio, text=result.text, timings=timings, seed=result.seed, tokens=result.tokens,
                      prompt_digest=result.prompt_digest)

    return ResultStream(produce, seed, sample_rate)


class Engine(abc.ABC):
    """A voice-cloning engine. Implementations must be thread-safe."""

    @abc.abstractmethod
    def describe(self) -> EngineInfo: ...

    @abc.abstractmethod
    def capabilities(self) -> tuple[EditCapability, ...]: ...

    @abc.abstractmethod
    def clone(self, prompt_audio: AudioSource, prompt_text: str, target_text: str, *, seed: int | None = None,
              options: CloneOptions = CloneOptions(), progress: ProgressFn = no_progress) -> Result:
        """Speak ``target_text`` in the voice of ``prompt_audio`` (whose transcript is ``prompt_text``).

        Raises:
            InputError: bad audio, empty or over-long text.
            ModelError: the models failed (e.g. produced no audio).
        """

    @abc.abstractmethod
    def edit(self, audio: AudioSource, audio_text: str, edit_type: str, edit_info: str | None = None,
             text: str | None = None, *, seed: int | None = None, options: CloneOptions = CloneOptions(),
             progress: ProgressFn = no_progress) -> Result:
        """Apply ``edit_type``/``edit_info`` to ``audio`` (which says ``audio_text``).

        ``text`` is the new text for paralinguistic edits (tags such as ``[Laughter]`` inside).
        """

    def edit_iterations(self, audio: AudioSource, audio_text: str, edit_type: str, edit_info: str | None = None,
                        text: str | None = None, *, iterations: int = 1, seed: int | None = None,
                        options: CloneOptions = CloneOptions(),
                        progress: ProgressFn = no_progress) -> tuple[Result, ...]:
        """Apply the same edit ``iterations`` times, each pass on the previous pass's audio (upstream's
        ``--n-edit-iter``: a stronger effect); returns every pass's result, in order.

        ``audio_text`` and ``text`` stay those of the request for every pass, as upstream does. Pass
        ``i`` (from 0) uses seed ``seed + i`` (folded), so a given seed repeats the whole chain.

        Raises:
            InputError: ``iterations`` outside 1..MAX_EDIT_ITERATIONS, or what :meth:`edit` raises.
        """
        iterations = validate_iterations(iterations)
        base_seed = new_seed(seed)
        results: list[Result] = []
        current: AudioSource = audio
        token = request_cancel_token()
        for i in range(iterations):
            if token is not None:
                token.check()   # a pass never starts for a client that went away
            def step(fraction: float, description: str, i: int = i) -> None:
                progress((i + fraction) / iterations,
                         f"pass {i + 1}/{iterations}: {description}" if iterations > 1 else description)

            result = self.edit(current, audio_text, edit_type, edit_info, text, seed=(base_seed + i) % 2**31,
                               options=options, progress=step)
            results.append(result)
            current = result.audio
        return tuple(results)

    def transcribe(self, audio: AudioSource) -> Transcript:
        """What ``audio`` says, by the engine's ASR model (for a prompt clip that came without its
        transcript).

        Raises:
            InputError: this engine has no ASR model (the message says how to get one), bad audio, or
                nothing was heard.
        """
        raise InputError(f"{self.describe().name} cannot transcribe audio; please type what the clip says")

    def clone_stream(self, prompt_audio: AudioSource, prompt_text: str, target_text: str, *,
                     seed: int | None = None, options: CloneOptions = CloneOptions()) -> ResultStream:
        """:meth:`clone` as a :class:`ResultStream` of audio chunks (see the module docstring).
        Engines with a streaming path override this; the default yields one chunk."""
        seed = new_seed(seed)
        return whole_result_stream(lambda: self.clone(prompt_audio, prompt_text, target_text, seed=seed,
                                                      options=options), seed, self.describe().sample_rate)

    def edit_stream(self, audio: AudioSource, audio_text: str, edit_type: str, edit_info: str | None = None,
                    text: str | None = None, *, seed: int | None = None,
                    options: CloneOptions = CloneOptions()) -> ResultStream:
        """:meth:`edit` as a :class:`ResultStream` (default: one chunk)."""
        seed = new_seed(seed)
        return whole_result_stream(lambda: self.edit(audio, audio_text, edit_type, edit_info, text, seed=seed,
                                                     options=options), seed, self.describe().sample_rate)

    @abc.abstractmethod
    def prepare_prompt(self, prompt_audio: AudioSource) -> PromptReport:
        """Do (or fetch from the cache) all prompt work for a clip, e.g. when a voice is saved."""

    def prompt_namespaces(self) -> Mapping[str, str]:
        """kind -> cache namespace of each prompt entry ``prepare_prompt`` stores, without computing
        anything (a voice bundle's entries are imported only where these match). Engines should
        override; the default ``{}`` means "unknown" and imports then recompute."""
        return {}

    @property
    @abc.abstractmethod
    def cache(self):
        """The engine's :class:`funasr_cache.PromptCache`."""

    def export_prompt(self, prompt_audio: AudioSource) -> tuple[PromptEntry, ...]:
        """The clip's prompt-cache entries, for a voice bundle. Entries that were evicted are
        computed again; reading them counts as no cache hit and no seconds saved.

        Raises:
            InputError / ModelError: as :meth:`prepare_prompt`.
        """
        with self.cache.uncounted():
            report = self.prepare_prompt(prompt_audio)
            entries = []
            for kind, namespace in sorted(report.namespaces.items()):
                entry = self.cache.get(kind, namespace, report.digest)
                if entry is None:
                    log.warning("cache entry %s/%s vanished before export", kind, namespace)
                    continue
                entries.append(PromptEntry(kind, namespace, report.digest, dict(entry.payload),
                                           dict(entry.arrays), float(entry.cost_s)))
        return tuple(entries)

    def import_prompt(self, prompt_audio: AudioSource, entries: tuple[PromptEntry, ...] = ()) -> PromptImport:
        """Prepare a clip, first storing those of ``entries`` (from a *verified* bundle) that
        match this engine's namespaces and the clip's digest and are not cached yet.

        An import never replaces an existing entry, and stores ``cost_s = 0`` (seconds the
        bundle claims were not saved here). If preparation fails, the entries it stored are
        removed again before the error propagates.

        Raises:
            InputError / ModelError: as :meth:`prepare_prompt`.
        """
        from core.audio_io import load_audio
        from core.errors import CacheError
        from funasr_cache.store import audio_digest

        wanted = dict(self.prompt_namespaces())
        added, imported = [], set()
        if entries:
            audio = load_audio(prompt_audio)
            digest = audio_digest(audio.samples, audio.sample_rate)
            prompt_audio = audio
            for entry in entries:
                if entry.digest != digest or wanted.get(entry.kind) != entry.namespace:
                    log.info("bundle entry %s/%s does not match this engine or clip; it is recomputed",
                             entry.kind, entry.namespace)
                    continue
                try:
                    stored = self.cache.add(entry.kind, entry.namespace, digest, dict(entry.payload), 0.0,
                                            dict(entry.arrays))
                except CacheError as exc:   # e.g. an array the cache cannot store
                    log.info("bundle entry %s/%s refused by the cache (%s); it is recomputed", entry.kind,
                             entry.namespace, exc)
                    continue
                if stored:
                    added.append((entry.kind, entry.namespace, digest))
                    imported.add(entry.kind)
        try:
            report = self.prepare_prompt(prompt_audio)
        except BaseException:
            for kind, namespace, digest in added:
                self.cache.discard(kind, namespace, digest)
            raise
        return PromptImport(report, frozenset(imported), tuple(added))

    def undo_prompt_import(self, done: PromptImport) -> None:
        """Remove the entries an import stored (when what followed it failed)."""
        for kind, namespace, digest in done.added:
            self.cache.discard(kind, namespace, digest)

    def ready(self) -> tuple[bool, str]:
        """(ready, reason) for /readyz; engines override to check their device."""
        return True, "ok"

    def close(self) -> None:
        """Release threads and memory."""


# --------------------------------------------------------------------------- validation

def new_seed(seed: int | None) -> int:
    """The request's seed: the caller's (folded into [0, 2**31), the range every generator here
    accepts), or a fresh random one; it is reported back in the Result."""
    if seed is None or seed < 0:
        return secrets.randbelow(2**31)
    return int(seed) % 2**31


def validate_text(text: str | None, what: str, max_chars: int) -> str:
    """Reject empty or over-long text; returns it unchanged (the model sees it verbatim)."""
    if text is None or not text.strip():
        raise InputError(f"{what} is empty")
    if len(text) > max_chars:
        raise InputError(f"{what} is {len(text)} characters long; the limit is {max_chars}")
    return text


def validate_iterations(iterations: int | None) -> int:
    """The number of edit passes (None: 1); refuses anything outside 1..MAX_EDIT_ITERATIONS."""
    if iterations is None:
        return 1
    if isinstance(iterations, bool) or not isinstance(iterations, int) or not 1 <= iterations <= MAX_EDIT_ITERATIONS:
        raise InputError(f"iterations must be a whole number from 1 to {MAX_EDIT_ITERATIONS}, not {iterations!r}")
    return iterations


def validate_edit(edit_type: str, edit_info: str | None, capabilities: tuple[EditCapability, ...]) -> str | None:
    """Check an edit request against what the engine can do; returns the normalised edit_info."""
    caps = {c.edit_type: c for c in capabilities}
    if edit_type not in caps:
        raise InputError(f"unsupported edit type {edit_type!r}; choose one of {', '.join(EDIT_TYPES)}")
    cap = caps[edit_type]
    if not cap.available:
        raise InputError(f"edit type {edit_type!r} is not available in this engine: {cap.note}")
    if not cap.options:
        return None
    if not edit_info:
        raise InputError(f"edit type {edit_type!r} needs an option; choose one of {', '.join(cap.options)}")
    if edit_info not in cap.options:
        raise InputError(f"unknown {edit_type} option {edit_info!r}; choose one of {', '.join(cap.options)}")
    if edit_info in cap.unavailable_options:
        raise InputError(f"{edit_type} option {edit_info!r} is not available in this engine: {cap.note}")
    return edit_info
