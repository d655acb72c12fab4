"""TEMPORARY: the current batched ``generate_batch`` behind the ``LLMBackend`` contract.

Owns: ``InterimBackend``, which sends each ``GenerationRequest`` through the engine's
``BatchScheduler`` + ``generate_batch`` and, when its batch has finished, puts the row's answer ids
into its ``GenerationStream`` and finishes it. So streams work end to end today, but ids arrive
all at once at the end of the batch: time to first audio is not better than a whole decode until
``llm.native.NativeBackend`` (continuous batching, one ``put`` per sampled id) replaces this module
at merge. Cancellation: a request cancelled before its batch starts is dropped from the queue; a
running batch cannot be stopped (its ids are discarded).
Does not own: sampling, batching (``llm/generation.py``, ``llm/batching.py``).
"""

from __future__ import annotations

import logging

from llm.backend import GenerationOutput, GenerationRequest, GenerationStream, LLMBackend
from llm.batching import BatchScheduler
from llm.generation import GenerationRequest as BatchRequest

log = logging.getLogger(__name__)


class _InterimStream(GenerationStream):
    """A stream whose ``cancel`` also drops its request from the scheduler's queue if not yet running."""

    future = None

    def cancel(self) -> None:
        super().cancel()
        if self.future is not None:
            self.future.cancel()   # only succeeds while the request still waits in the queue


class InterimBackend(LLMBackend):
    """``LLMBackend`` over a ``BatchScheduler`` whose ``run_batch`` is ``generate_batch`` (TEMPORARY).

    Parameters:
        scheduler: the engine's scheduler (shared with its non-streaming calls).
        llm: the loaded LLM (``encode``, ``eos_ids``).
    """

    name = "interim-batch"

    def __init__(self, scheduler: BatchScheduler, llm) -> None:
        self.scheduler = scheduler
        self.llm = llm

    def submit(self, request: GenerationRequest) -> GenerationStream:
        stream = _InterimStream(request)
        future = self.scheduler.submit(BatchRequest(tuple(request.prompt_ids), request.seed))
        stream.future = future

        def done(f) -> None:
            if f.cancelled():
                stream.finish(GenerationOutput((), 0.0, 0.0, 0, cancelled=True))
                return
            exc = f.exception()
            if exc is not None:
                stream.fail(exc)
                return
            out = f.result()
            if not stream.cancelled:
                for token_id in out.answer:
                    stream.put(token_id)
            stream.finish(GenerationOutput(out.answer, out.prefill_ms, out.decode_ms, out.batch_size, out.batch_id,
                                           out.steps, out.sampling_ms, cancelled=stream.cancelled))

        future.add_done_callback(done)
        return stream

    def encode(self, text: str) -> list[int]:
        return self.llm.encode(text)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return tuple(self.llm.eos_ids)

    def stats(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.scheduler.stats().items()}
