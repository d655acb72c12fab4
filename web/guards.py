"""ASGI guards in front of every route: the Host check, the same-origin rule, the API key before the
body, and the request-body byte limit.

Owns: :class:`HostGuard` (a ``Host`` outside ``allowed_hosts`` is a 400 naming the setting: a
DNS-rebinding page sends its own name); :class:`OriginGuard` (the same-origin rule for every
state-changing request of the app -- ``/v1``, Gradio's ``/gradio_api/...``, ``/login``, uploads,
WebSocket handshakes -- since a form POST from any web page needs no CORS preflight, only the
``Origin`` header can stop it; it also strips ``Access-Control-Allow-*`` from answers to origins not
in ``cors_origins``, which Gradio would reflect, and rewrites Gradio's login cookies to
``SameSite=Lax``); :class:`KeyGuard` with :class:`FailureLimiter` (the key on ``/v1`` and the API docs,
checked before any body byte is read; wrong keys and page logins limited per client address, then
429 + ``Retry-After``); :class:`BodyLimit`, which enforces ``max_upload_bytes`` (plus multipart
framing) while the body streams in -- a declared ``Content-Length`` over the limit is refused before a
byte is read, and a chunked body is cut off at the first byte over it, before the route has parsed
it (multipart spooled to disk, JSON read into RAM).
Does not own: request ids and the JSON 500 (``web.deps.StudioMiddleware``), CORS itself (Starlette's
``CORSMiddleware``, added by ``web.server`` only when ``cors_origins`` is configured), admission of
engine work (``web.admission``). The threat model is docs/security.md.

A refused body is answered (413, or 401/429 before reading it) with ``Connection: close``; the rest
of it is read and dropped (up to :data:`DRAIN_LIMIT` bytes, never stored) so that the client sees the
answer instead of a reset connection. Requests without an ``Origin`` header (curl, SDKs,
server-to-server) are not browser cross-site requests and pass (unless the browser marks them
``Sec-Fetch-Site: cross-site``); so does an ``Origin`` naming this server's own host or one listed
in ``cors_origins``.
"""

from __future__ import annotations

import base64
import logging
import math
import secrets
import threading
import time
from collections import OrderedDict, deque
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


def _host_name(host: str) -> str:
    """``host[:port]`` or ``[v6]:port`` -> the lower-case name without port or brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _origin_netloc(origin: str) -> str:
    return urlsplit(origin).netloc.lower() if origin not in ("", "null") else ""


async def _refuse_ws_or_http(scope, send, status: int, payload: dict) -> None:
    """Answer ``payload``: to an HTTP request, or to a WebSocket handshake as its HTTP denial response where
    the server supports that ASGI extension (uvicorn does), so a client reads why; else the handshake is
    closed (the server answers 403 without a body)."""
    if scope["type"] == "websocket":
        if "websocket.http.response" not in (scope.get("extensions") or {}):
            await send({"type": "websocket.close", "code": 1008})
            return

        async def denial(message):   # the same response, as the extension's message types
            await send({**message, "type": "websocket." + message["type"]})

        await _send_json(denial, status, payload, _rid(scope))
        return
    await _send_json(send, status, payload, _rid(scope))


# Orchestrators and scrapers call these by the container's address (e.g. a pod IP); they change nothing
# and show no voice or text, so they answer whatever the Host.
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class HostGuard:
    """400 for a ``Host`` header outside ``allowed_hosts`` (a DNS-rebinding page sends its own name);
    the probes (:data:`PROBE_PATHS`) answer any host."""

    def __init__(self, app, allowed_hosts: tuple[str, ...]) -> None:
        self.app = app
        self.any = "*" in allowed_hosts
        self.allowed = frozenset(h.strip("[]") for h in allowed_hosts)

    def allows(self, scope) -> bool:
        if self.any or (scope["type"] == "http" and scope["path"] in PROBE_PATHS):
            return True
        host = _header(scope, b"host")
        return host is not None and _host_name(host) in self.allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket") and not self.allows(scope):
            host = _header(scope, b"host")
            log.warning("refused %s %s for Host %r (setting allowed_hosts)", scope.get("method", "WS"),
                        scope["path"], host)
            await _refuse_ws_or_http(scope, send, 400, {"error": {
                "message": f"host {host!r} is not served here; add its name to the setting allowed_hosts "
                           "(--allowed-hosts / STUDIO_ALLOWED_HOSTS) to allow it",
                "type": "invalid_request_error", "code": "host_not_allowed", "request_id": _rid(scope)}})
            return
        await self.app(scope, receive, send)


class OriginGuard:
    """The same-origin rule for the whole app (``/v1``, Gradio's ``/gradio_api/...``, ``/login``,
    uploads, WebSockets): a state-changing request whose ``Origin`` is neither this host nor listed in
    ``cors_origins`` is refused with 403; ``Access-Control-Allow-*`` headers (Gradio reflects any
    origin with credentials) are removed from answers to origins not listed; Gradio's login cookies
    are rewritten to ``SameSite=Lax`` (Gradio 6 hard-codes ``SameSite=None`` and has no option).

    Runs after :class:`HostGuard`, so the ``Host`` it compares with is one of ``allowed_hosts``.
    """

    def __init__(self, app, allowed_origins: tuple[str, ...] = ()) -> None:
        self.app = app
        self.allowed = frozenset(o.rstrip("/") for o in allowed_origins)

    def listed(self, origin: str | None) -> bool:
        return origin is not None and ("*" in self.allowed or origin.strip().rstrip("/") in self.allowed)

    def allows(self, scope) -> bool:
        origin = _header(scope, b"origin")
        if origin is None:
            # Not a browser's cross-site request (curl, SDKs), unless a browser says it is one.
            return (_header(scope, b"sec-fetch-site") or "").strip().lower() != "cross-site"
        if self.listed(origin):
            return True
        host = _header(scope, b"host")
        netloc = _origin_netloc(origin.strip().rstrip("/"))
        # Same host (and port) as the request was sent to: the page's own origin. The scheme is not
        # compared: behind a TLS proxy the browser says https while this server sees http.
        return bool(netloc) and host is not None and netloc == host.strip().lower()

    async def __call__(self, scope, receive, send):
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        state_changing = kind == "websocket" or scope.get("method", "GET") not in _SAFE_METHODS
        if state_changing and not self.allows(scope):
            origin = _header(scope, b"origin")
            log.warning("refused a cross-origin %s %s from %r", scope.get("method", "WS"), scope["path"], origin)
            await _refuse_ws_or_http(scope, send, 403, {"error": {
                "message": f"cross-origin request from {origin!r} refused; browsers may call this server only "
                           "from its own origin or one listed in cors_origins",
                "type": "invalid_request_error", "code": "cross_origin_refused", "request_id": _rid(scope)}})
            return
        if kind == "websocket":
            return await self.app(scope, receive, send)
        keep_cors = self.listed(_header(scope, b"origin"))

        async def cleaned_send(message):
            if message["type"] == "http.response.start":
                headers = []
                for key, value in message.get("headers") or []:
                    name = key.lower()
                    if name.startswith(b"access-control-allow-") and not keep_cors:
                        continue   # never let another site read an answer (Gradio reflects any origin)
                    if name == b"set-cookie":
                        value = _same_site_lax(value)
                    headers.append((key, value))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, cleaned_send)


def _same_site_lax(cookie: bytes) -> bytes:
    """A ``Set-Cookie`` value with ``SameSite=Lax`` (replacing ``None`` or adding it; ``Strict`` stays):
    the login cookie then goes with top-level navigations only, never with another site's requests."""
    parts = [p.strip() for p in cookie.split(b";")]
    same = [i for i, p in enumerate(parts) if p.lower().startswith(b"samesite")]
    if any(parts[i].lower() == b"samesite=strict" for i in same):
        return cookie
    parts = [p for i, p in enumerate(parts) if i not in same] + [b"SameSite=Lax"]
    return b"; ".join(parts)


class FailureLimiter:
    """Wrong keys per client address in a sliding minute; thread-safe, bounded memory.

    Parameters:
        per_minute: failures a client may make in any 60 s (setting ``auth_failures_per_minute``).
        max_clients: addresses remembered (the oldest is forgotten first), so a flood of addresses
            cannot grow the table without bound.
    """

    WINDOW_S = 60.0

    def __init__(self, per_minute: int, max_clients: int = 4096, clock=time.monotonic) -> None:
        self.per_minute = per_minute
        self.max_clients = max_clients
        self._clock = clock
        self._lock = threading.Lock()
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after(self, client: str) -> int:
        """Seconds until ``client`` may try again (0: now)."""
        with self._lock:
            times = self._failures.get(client)
            if not times:
                return 0
            now = self._clock()
            while times and now - times[0] >= self.WINDOW_S:
                times.popleft()
            if len(times) < self.per_minute:
                return 0
            return max(1, math.ceil(self.WINDOW_S - (now - times[0])))

    def fail(self, client: str) -> None:
        with self._lock:
            times = self._failures.pop(client, None) or deque(maxlen=self.per_minute)
            times.append(self._clock())
            self._failures[client] = times   # most recent last
            while len(self._failures) > self.max_clients:
                self._failures.popitem(last=False)


_DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


def key_protected(path: str) -> bool:
    """Paths that need the API key when one is set: the API and its documentation."""
    return path.startswith("/v1/") or path == "/v1" or path in _DOCS_PATHS


def presented_key(scope) -> str | None:
    """The key in ``Authorization: Bearer <key>`` or ``Basic base64(<any user>:<key>)`` (a browser's
    login prompt, for /docs), or None."""
    scheme, _, token = (_header(scope, b"authorization") or "").strip().partition(" ")
    scheme, token = scheme.lower(), token.strip()
    if scheme == "bearer":
        return token
    if scheme == "basic":
        try:
            return base64.b64decode(token, validate=True).decode("utf-8").partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            return None
    return None


class KeyGuard:
    """With an API key set: the key is checked here, before any byte of the body is read, on ``/v1``
    and the API docs (a request without it gets 401 at once, so a malformed body cannot tell an
    attacker anything); a client whose wrong keys -- or wrong page logins (``POST /login``) -- reach
    ``limiter.per_minute`` in a minute gets 429 + ``Retry-After`` on those paths, right or wrong key.
    ``/healthz``, ``/readyz`` and ``/metrics`` stay open; the page itself is behind Gradio's login."""

    def __init__(self, app, api_key: str, limiter: FailureLimiter) -> None:
        self.app = app
        self.key = api_key.encode()
        self.limiter = limiter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.key:
            return await self.app(scope, receive, send)
        path = scope["path"]
        login = path == "/login" and scope.get("method") == "POST"
        if not (login or key_protected(path)) or scope.get("method") == "OPTIONS":
            return await self.app(scope, receive, send)
        client = (scope.get("client") or ("unknown", 0))[0]
        wait = self.limiter.retry_after(client)
        if wait:
            log.warning("refused %s %s from %s: too many wrong keys (setting auth_failures_per_minute)",
                        scope.get("method"), path, client)
            await _send_json(send, 429, {"error": {
                "message": f"too many wrong API keys or logins from this address; retry in {wait} s",
                "type": "rate_limit_error", "code": "too_many_auth_failures", "request_id": _rid(scope)}},
                _rid(scope), close=True, extra=[(b"retry-after", str(wait).encode())])
            await _drain(receive)
            return
        if login:   # Gradio checks the password; a 400 from it is a wrong one
            async def watching_send(message):
                if message["type"] == "http.response.start" and message["status"] == 400:
                    self.limiter.fail(client)
                await send(message)

            return await self.app(scope, receive, watching_send)
        key = presented_key(scope)
        if key is not None and secrets.compare_digest(key.encode(), self.key):
            return await self.app(scope, receive, send)
        self.limiter.fail(client)
        docs = path in _DOCS_PATHS
        await _send_json(send, 401, {"error": {
            "message": "missing or wrong API key: send 'Authorization: Bearer <key>'",
            "type": "authentication_error", "code": "invalid_api_key", "request_id": _rid(scope)}},
            _rid(scope), close=True,
            # For the docs, Basic lets a browser ask for the key (any user name, the key as password).
            extra=[(b"www-authenticate", b'Basic realm="studio API docs"' if docs else b"Bearer")])
        await _drain(receive)
