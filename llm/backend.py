"""The contract between the engine and whatever runs the LLM (our own Step1 loop, or vLLM).

Owns: ``GenerationRequest`` (prompt ids, seed, budget), ``GenerationOutput`` (one finished answer and its
timings), ``GenerationStream`` (a handle on one request in flight: its answer ids as they are sampled,
cancellation, the final output) and the ``LLMBackend`` interface that hands out streams.
Does not own: how ids are sampled or batched (``llm/native.py`` and ``llm/vllm_backend.py`` do that), nor
what the ids mean (``core/audio_tokens.py``).

Thread-safety: a backend's ``submit`` may be called from any thread; a stream is fed by the backend's
worker (``put`` / ``finish`` / ``fail``) and read by one consumer thread.
"""

from __future__ import annotations

import abc
import queue
import threading
from dataclasses import dataclass
from typing import Iterator

_END = object()


@dataclass(frozen=True)
class GenerationRequest:
    """One answer to generate. ``max_new_tokens`` None: the sampling config's budget for the prompt length."""

    prompt_ids: tuple[int, ...]
    seed: int
    max_new_tokens: int | None = None


@dataclass(frozen=True)
class GenerationOutput:
    """One finished answer: its ids up to (not including) the end-of-answer id, and how it was made."""

    answer: tuple[int, ...]
    prefill_ms: float          # this row's prompt pass
    decode_ms: float           # from its first sampled id to its last
    batch_size: int            # most rows that shared a decode step with this one
    batch_id: int = 0          # rows that started in one batch share it (native static batching; else 0)
    steps: int = 0             # decode steps this row took
    sampling_ms: float = 0.0   # of prefill + decode, time spent in the sampler
    queue_ms: float = 0.0      # from submit to the start of its prefill
    cancelled: bool = False    # the consumer cancelled it; ``answer`` holds what was sampled until then


class GenerationCancelled(Exception):
    """Raised by ``GenerationStream.result`` when the request was cancelled before it finished."""


class GenerationStream:
    """A request in flight: iterate it for answer ids as they are sampled, or wait for ``result()``.

    The backend calls ``put(id)`` for each sampled id, then ``finish(output)`` or ``fail(exc)``; a
    consumer that goes away calls ``cancel()``, and the backend stops working on the row at its next
    step (``cancelled`` tells it to). Iteration ends after the last id; if the request failed, the
    iterator raises the backend's exception.
    """

    def __init__(self, request: GenerationRequest) -> None:
        self.request = request
        self._ids: queue.SimpleQueue = queue.SimpleQueue()
        self._done = threading.Event()
        self._cancel = threading.Event()
        self._output: GenerationOutput | None = None
        self._error: BaseException | None = None

    # ------------------------------------------------------------------ backend side
    def put(self, token_id: int) -> None:
        self._ids.put(int(token_id))

    def finish(self, output: GenerationOutput) -> None:
        self._output = output
        self._done.set()
        self._ids.put(_END)

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._done.set()
        self._ids.put(_END)

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    # ------------------------------------------------------------------ consumer side
    def cancel(self) -> None:
        """Ask the backend to stop this request and free its slot. Safe to call at any time, twice too."""
        self._cancel.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def __iter__(self) -> Iterator[int]:
        while True:
            item = self._ids.get()
            if item is _END:
                if self._error is not None:
                    raise self._error
                return
            yield item

    def result(self, timeout: float | None = None) -> GenerationOutput:
        """The finished output.

        Raises:
            TimeoutError: not finished within ``timeout`` seconds.
            GenerationCancelled: cancelled before it finished.
            Exception: whatever the backend failed with.
        """
        if not self._done.wait(timeout):
            raise TimeoutError(f"the LLM did not answer within {timeout} s")
        if self._error is not None:
            raise self._error
        assert self._output is not None
        if self._output.cancelled:
            raise GenerationCancelled("the request was cancelled")
        return self._output


class LLMBackend(abc.ABC):
    """Runs the LLM for the engine. Implementations: ``llm.native.NativeBackend`` (our Step1),
    ``llm.vllm_backend`` (vLLM in-process or a shared ``vllm serve``)."""

    name: str = "llm"

    @abc.abstractmethod
    def submit(self, request: GenerationRequest) -> GenerationStream:
        """Queue ``request``; returns at once. Raises ``ModelError`` when the backend cannot take work
        (e.g. its server is down) and ``InputError`` when the prompt does not fit the model."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Text -> LLM ids, without BOS (prompt pieces are encoded one by one)."""

    @property
    @abc.abstractmethod
    def eos_ids(self) -> tuple[int, ...]:
        """Ids that end an answer."""

    def ready(self) -> tuple[bool, str]:
        """(ready, reason) for /readyz."""
        return True, "ok"

    def stats(self) -> dict[str, float]:
        """Numbers for /metrics and the page (rows running, queue depth, ...); {} when none."""
        return {}

    def describe(self) -> str:
        """One line for logs and the engine description (what runs, how big)."""
        return self.name

    def close(self) -> None:
        """Stop workers and release memory; streams still open fail with ``RuntimeError``."""
