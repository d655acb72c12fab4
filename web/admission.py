"""Admission control: how much engine work the studio takes on at once, and what happens to the rest.

Owns: :class:`Admission` (a counter of engine requests running now, with a fixed limit; ``admit()``
is a context manager, sync and async, that takes a slot or raises :class:`Overloaded` at once --
it never waits), :class:`Overloaded` (carries ``retry_after`` seconds), :class:`AdmissionGuard` (the
ASGI middleware that admits the HTTP routes that run the engine before their body is read, holds
the slot until the response -- a stream included -- has ended, answers the overflow ``503`` with
``Retry-After``, gives each admitted request a :class:`~tts_engine.contract.CancelToken` in
``scope["state"]["cancel"]`` that is cancelled when the client disconnects or the request's deadline
passes) and :func:`engine_request` (whether a method and path are such a route).
Does not own: the routes (``web.api``, ``web.api_voices``), the page's queue (``web.ui``), how the
engine stops on a cancelled token (``tts_engine``).

Why refuse instead of queueing: a queued HTTP request holds a connection, a worker thread and its
body while it waits, and its client cannot tell a slow server from a stuck one; an immediate 503
with ``Retry-After`` keeps the server's memory and ``/healthz`` latency bounded, and lets a load
balancer send the request elsewhere.

Reuse (e.g. a WebSocket route)::

    try:
        async with request.app.state.admission.admit("speech_ws"):
            ...   # the engine work
    except Overloaded as busy:
        ...       # tell the client to come back in busy.retry_after seconds
"""

from __future__ import annotations

import logging
import re
import threading
from contextlib import asynccontextmanager, contextmanager
from typing import AsyncIterator, Iterator

import anyio

from tts_engine.contract import CancelToken

log = logging.getLogger(__name__)

# The HTTP routes that run the engine: speech, edits, transcriptions, voice uploads and imports
# (both prepare the clip's prompt). Reads (lists, stats, exports) are cheap and never refused.
_ENGINE_ROUTES = re.compile(r"/v1/audio/(speech|edits|transcriptions|voices|voices/import)/?")


class Overloaded(Exception):
    """Every admission slot is taken; ask again in ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Admission:
    """At most ``limit`` engine requests at once; thread-safe; never blocks.

    Parameters:
        limit: slots (setting ``max_engine_requests``).
        retry_after_s: the ``retry_after`` of :class:`Overloaded` (setting ``busy_retry_after_s``).
    """

    def __init__(self, limit: int, retry_after_s: int) -> None:
        if limit < 1 or retry_after_s < 1:
            raise ValueError(f"limit and retry_after_s must be at least 1, not {limit!r} and {retry_after_s!r}")
        self.limit = limit
        self.retry_after_s = retry_after_s
        self._lock = threading.Lock()
        self._running = 0
        self.refused = 0          # requests answered Overloaded since start

    @property
    def running(self) -> int:
        return self._running

    def try_acquire(self) -> bool:
        with self._lock:
            if self._running >= self.limit:
                self.refused += 1
                return False
            self._running += 1
            return True

    def release(self) -> None:
        with self._lock:
            if self._running <= 0:
                raise RuntimeError("Admission.release() without a slot")  # a caller bug
            self._running -= 1

    def acquire_or_raise(self, what: str = "request") -> None:
        """Take a slot or raise :class:`Overloaded` (pair it with :meth:`release`)."""
        if not self.try_acquire():
            log.info("%s refused: %d engine requests running (setting max_engine_requests)", what, self.limit)
            raise Overloaded(f"the studio is busy: {self.limit} engine requests are running (setting "
                             f"max_engine_requests); retry in {self.retry_after_s} s", self.retry_after_s)

    @contextmanager
    def admit_sync(self, what: str = "request") -> Iterator[None]:
        """``with admission.admit_sync("clone"):`` -- a slot for the block, or :class:`Overloaded`."""
        self.acquire_or_raise(what)
        try:
            yield
        finally:
            self.release()

    @asynccontextmanager
    async def admit(self, what: str = "request") -> AsyncIterator[None]:
        """``async with admission.admit("speech_ws"):`` -- a slot for the block, or :class:`Overloaded`."""
        self.acquire_or_raise(what)
        try:
            yield
        finally:
            self.release()


def engine_request(method: str, path: str) -> bool:
    """Whether ``method path`` is an HTTP route that runs the engine."""
    return method == "POST" and _ENGINE_ROUTES.fullmatch(path) is not None


class AdmissionGuard:
    """ASGI middleware: admit engine routes (or answer 503 + ``Retry-After``), cancel their work when
    the client disconnects or ``deadline_s`` passes. Must run after the key check and body limit."""

    def __init__(self, app, admission: Admission, deadline_s: float) -> None:
        self.app = app
        self.admission = admission
        self.deadline_s = deadline_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not engine_request(scope.get("method", ""), scope["path"]):
            return await self.app(scope, receive, send)
        from web.deps import _send_json   # web.deps imports the engine contract; keep this module light

        rid = scope.get("state", {}).get("request_id", "")
        try:
            self.admission.acquire_or_raise(f"request {rid} ({scope['path']})")
        except Overloaded as busy:
            await _send_json(send, 503, {"error": {"message": str(busy), "type": "server_error", "code": "busy",
                                                   "request_id": rid}}, rid,
                             extra=[(b"retry-after", str(busy.retry_after).encode())])
            return
        token = CancelToken()
        scope.setdefault("state", {})["cancel"] = token
        body_done = anyio.Event()
        disconnected = anyio.Event()

        async def app_receive():
            # The route reads its body through here; once it is whole, the watcher below owns the
            # real receive (only it may wait there) and the route sees a disconnect it reports.
            if body_done.is_set():
                await disconnected.wait()
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.disconnect":
                disconnected.set()
                token.cancel()
            elif not message.get("more_body", False):
                body_done.set()
            return message

        async def watch() -> None:
            await body_done.wait()
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    disconnected.set()
                    if not token.cancelled:
                        log.info("request %s (%s): the client went away; its engine work is cancelled",
                                 rid, scope["path"])
                    token.cancel()
                    return

        async def expire() -> None:
            # Not a cancel scope around the route: a ``def`` route's worker thread cannot be cancelled,
            # so the token is what stops the engine, and the route answers (a 503) when it sees it.
            await anyio.sleep(self.deadline_s)
            scope["state"]["deadline_passed"] = True
            log.warning("request %s (%s) passed its %.0f s deadline (setting request_timeout_s); its engine work "
                        "is cancelled", rid, scope["path"], self.deadline_s)
            token.cancel()

        async def run() -> None:
            try:
                await self.app(scope, app_receive, send)
            finally:
                group.cancel_scope.cancel()

        try:
            async with anyio.create_task_group() as group:
                group.start_soon(watch)
                group.start_soon(expire)
                group.start_soon(run)
        finally:
            token.cancel()   # the work ends with the request, whatever ended it
            self.admission.release()
