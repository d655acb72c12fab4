"""One scheduler for every LLM call: serialises them and batches the ones that arrive together.

Owns: a worker thread that takes the first waiting request, waits at most ``window_s`` for
others (never longer, and not at all once ``max_batch`` are waiting), runs them as one batch
through ``run_batch``, and hands each caller its own row (or the batch's exception).
Also keeps a short record of batch sizes for stats and tests.
Does not own: what a request is or how a batch runs (the caller's ``run_batch``).

Thread-safety: ``submit`` may be called from any number of threads; ``run_batch`` is only ever
called from the worker, one batch at a time, so model calls never overlap.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Callable, Generic, Sequence, TypeVar

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Out = TypeVar("Out")
_STOP = object()


class BatchScheduler(Generic[Req, Out]):
    """Collect requests for up to ``window_s`` seconds into batches of at most ``max_batch``.

    Parameters:
        run_batch: runs a list of requests, returns one output per request, in order.
        window_s: how long the first request of a batch waits for company (0: never waits).
        max_batch: most requests per batch (1: batching off, calls still serialised).
    """

    def __init__(self, run_batch: Callable[[list[Req]], Sequence[Out]], window_s: float, max_batch: int,
                 name: str = "llm-batcher") -> None:
        if max_batch < 1 or window_s < 0:
            raise ValueError(f"max_batch must be >= 1 and window_s >= 0, not {max_batch}, {window_s}")
        self._run_batch = run_batch
        self.window_s = float(window_s)
        self.max_batch = int(max_batch)
        self._queue: queue.Queue = queue.Queue()
        self._sizes: collections.deque[int] = collections.deque(maxlen=1000)
        self._lock = threading.Lock()
        self._batches = 0
        self._requests = 0
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, request: Req) -> "Future[Out]":
        """Queue ``request``; the future resolves to its output or raises the batch's error."""
        future: Future[Out] = Future()
        with self._lock:   # with close(): nothing is queued behind the stop marker, where no one would serve it
            if self._closed:
                raise RuntimeError("the LLM scheduler is closed")
            self._queue.put((request, future))
        return future

    def run(self, request: Req) -> Out:
        """Submit and wait."""
        return self.submit(request).result()

    def run_many(self, requests: Sequence[Req]) -> list[Out]:
        """Submit several requests at once (they may share batches) and wait for all."""
        futures = [self.submit(r) for r in requests]
        return [f.result() for f in futures]

    @property
    def batch_sizes(self) -> list[int]:
        """Sizes of the most recent batches (oldest first, up to 1000)."""
        with self._lock:
            return list(self._sizes)

    def stats(self) -> dict:
        with self._lock:
            return {"batches": self._batches, "requests": self._requests,
                    "max_batch": self.max_batch, "window_ms": self.window_s * 1000.0}

    def close(self, timeout: float = 5.0) -> None:
        """Finish queued work and stop the worker."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put((_STOP, None))
        self._thread.join(timeout)

    def _collect(self, first) -> tuple[list, bool]:
        batch, stop = [first], False
        deadline = time.monotonic() + self.window_s
        while len(batch) < self.max_batch:
            try:
                # Requests already waiting join without delay; otherwise wait out the window.
                remaining = deadline - time.monotonic()
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item[0] is _STOP:
                stop = True
                break
            batch.append(item)
        return batch, stop

    def _work(self) -> None:
        while True:
            first = self._queue.get()
            if first[0] is _STOP:
                return
            batch, stop = self._collect(first)
            live = [(r, f) for r, f in batch if f.set_running_or_notify_cancel()]
            if live:
                self._execute(live)
            if stop:
                return

    def _execute(self, batch: list) -> None:
        with self._lock:
            self._sizes.append(len(batch))
            self._batches += 1
            self._requests += len(batch)
        try:
            outputs = list(self._run_batch([r for r, _ in batch]))
            if len(outputs) != len(batch):
                raise RuntimeError(f"run_batch returned {len(outputs)} outputs for {len(batch)} requests")
        except BaseException as exc:  # noqa: BLE001 -- every caller must hear about the failure
            log.debug("LLM batch of %d failed: %s", len(batch), exc)
            for _, f in batch:
                f.set_exception(exc)
            return
        for (_, f), out in zip(batch, outputs):
            f.set_result(out)
