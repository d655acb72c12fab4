"""ASGI guards in front of every route: the request-body byte limit and the cross-origin check.

Owns: :class:`BodyLimit`, which enforces ``max_upload_bytes`` (plus multipart framing) on every
HTTP request while its body streams in -- a declared ``Content-Length`` over the limit is refused
before a byte is read, and a chunked body is cut off at the first byte over it, before the route
has parsed it (multipart spooled to disk, JSON read into RAM) and before any dependency (the API
key) runs; and :class:`OriginGuard`, which refuses browser requests from other sites that would
change state under ``/v1`` (a form POST from any web page to ``/v1/cache/clear`` needs no CORS
preflight, so only the ``Origin`` header can stop it).
Does not own: request ids and the JSON 500 (``web.deps.StudioMiddleware``), CORS itself (Starlette's
``CORSMiddleware``, added by ``web.server`` only when ``cors_origins`` is configured), the key check.

A refused body is answered ``413`` with ``Connection: close``; the rest of it is read and dropped
(up to :data:`DRAIN_LIMIT` bytes, never stored) so that the client sees the answer instead of a
reset connection. Requests without an ``Origin`` header (curl, SDKs, server-to-server) are not
browser cross-site requests and pass; so does an ``Origin`` naming this server's own host or one
listed in ``cors_origins``.
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

from web.deps import _send_json

log = logging.getLogger(__name__)

FRAMING_BYTES = 64 * 1024          # multipart boundaries and part headers around the file itself
DRAIN_LIMIT = 64 * 1024 * 1024     # bytes of a refused body read and dropped before closing
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _rid(scope) -> str:
    return scope.get("state", {}).get("request_id", "")


class BodyLimit:
    """Refuse HTTP request bodies over ``max_body_bytes`` (+ framing) as they stream in."""

    def __init__(self, app, max_body_bytes: int) -> None:
        self.app = app
        self.limit = max_body_bytes
        self.max_bytes = max_body_bytes + FRAMING_BYTES

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._refuse(send, scope, int(length))
            return
        received, over, started = 0, False, False

        async def limited_receive():
            nonlocal received, over
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # The route sees a client that went away (Starlette raises ClientDisconnect), so
                    # whatever it buffered so far is dropped; it never sees the bytes over the limit.
                    over = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            nonlocal started
            if over:
                return  # the route's answer to the "disconnect"; ours (413) is sent below
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not over:
                raise
            # The route failed on the cut-off body (e.g. a parser that does not expect a
            # disconnect); that is the refusal we answer below, not a server error.
        if over and not started:
            await self._refuse(send, scope, None)
            await _drain(receive)

    async def _refuse(self, send, scope, length: int | None) -> None:
        size = f"{length} bytes" if length is not None else f"more than {self.max_bytes} bytes"
        log.info("request %s %s refused: body of %s over the %d-byte upload limit", scope.get("method"),
                 scope.get("path"), size, self.limit)
        message = f"request body is {size}; uploads are limited to {self.limit} bytes (setting max_upload_bytes)"
        await _send_json(send, 413, {"error": {"message": message, "type": "invalid_request_error",
                                               "code": "payload_too_large", "request_id": _rid(scope)}},
                         _rid(scope), close=True)


async def _drain(receive) -> None:
    """Read and drop what the client still sends, up to DRAIN_LIMIT, so it can read our answer."""
    dropped = 0
    while dropped < DRAIN_LIMIT:
        message = await receive()
        if message["type"] != "http.request":
            return
        dropped += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers") or []:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class OriginGuard:
    """403 for state-changing ``/v1`` requests whose ``Origin`` is neither this host nor allowed."""

    def __init__(self, app, allowed_origins: tuple[str, ...] = ()) -> None:
        self.app = app
        self.allowed = frozenset(o.rstrip("/") for o in allowed_origins)

    def allows(self, scope) -> bool:
        origin = _header(scope, b"origin")
        if origin is None:
            return True  # not a browser's cross-site request
        origin = origin.strip().rstrip("/")
        if "*" in self.allowed or origin in self.allowed:
            return True
        host = _header(scope, b"host")
        netloc = urlsplit(origin).netloc if origin != "null" else ""
        # Same host (and port) as the request was sent to: the page's own origin. The scheme is not
        # compared: behind a TLS proxy the browser says https while this server sees http.
        return bool(netloc) and host is not None and netloc.lower() == host.strip().lower()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/") \
                and scope.get("method", "GET") not in _SAFE_METHODS and not self.allows(scope):
            origin = _header(scope, b"origin")
            log.warning("refused a cross-origin %s %s from %r", scope.get("method"), scope["path"], origin)
            await _send_json(send, 403, {"error": {
                "message": f"cross-origin request from {origin!r} refused; browsers may call this API only "
                           "from its own origin or one listed in cors_origins",
                "type": "invalid_request_error", "code": "cross_origin_refused", "request_id": _rid(scope)}},
                _rid(scope))
            return
        await self.app(scope, receive, send)
