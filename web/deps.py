"""What every HTTP route shares: dependencies, the error format, request ids, upload limits.

Owns: the overridable dependencies (``get_engine``, ``get_settings``, ``get_voices``, ``get_db``,
``get_metrics``), the optional Bearer key check, the JSON error body and the mapping from studio
errors to status codes, the ASGI middleware (request ids, a JSON 500 for anything
uncaught), and ``run_engine_call`` (the one place an engine call from the API or the page is
timed, counted, logged and has unexpected errors logged under the request id; ``run_engine`` is
its HTTP form, answering those with a 500).
Does not own: the routes themselves (``web.api``, ``web.api_voices``).

Error body (OpenAI style, so its clients show the message)::

    {"error": {"message": "...", "type": "invalid_request_error", "code": "voice_not_found",
               "request_id": "3f2a9c01d2e4"}}
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import secrets
from typing import Callable, TypeVar

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import BackendUnavailable, CacheError, InputError, ModelError, StudioError
from core.settings import Settings
from tts_engine.contract import Engine, Result, StreamCancelled, cancellable
from web.metrics import Metrics
from userdata.db import Database, StoreUnavailable
from userdata.voices import VoiceExists, VoiceQuotaExceeded
from web.voices import VoiceNotFound, VoiceStore

log = logging.getLogger(__name__)
T = TypeVar("T")


class APIError(Exception):
    """An HTTP error with a JSON body; raised by routes and dependencies."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.headers = status, message, type_, code, headers


# ----------------------------------------------------------------------------- dependencies

def get_engine(request: Request) -> Engine:
    return request.app.state.engine


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_voices(request: Request) -> VoiceStore:
    return request.app.state.voices


def get_db(request: Request) -> Database:
    return request.app.state.db


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def request_id(request) -> str:
    """The id the middleware gave this HTTP request (also the id of a page event: Gradio hands the
    handler the request that queued it); a fresh one for a request that did not pass through it."""
    scope = getattr(request, "scope", None) or {}
    return scope.get("state", {}).get("request_id") or secrets.token_hex(6)


def require_api_key(request: Request, settings: Settings = Depends(get_settings)) -> None:
    """When ``settings.api_key`` is set, demand ``Authorization: Bearer <key>``."""
    if not settings.api_key:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), settings.api_key.encode()):
        raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                       "authentication_error", "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


# ----------------------------------------------------------------------------- errors

def error_response(status: int, message: str, type_: str, code: str | None, rid: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "code": code, "request_id": rid}}
    return JSONResponse(body, status_code=status, headers={**(headers or {}), "X-Request-Id": rid})


# A studio error's answer: the first row whose class matches wins (subclasses before their bases).
_ERROR_STATUS = (
    (VoiceNotFound, 404, "invalid_request_error", "voice_not_found"),
    (VoiceExists, 409, "invalid_request_error", "voice_exists"),
    (VoiceQuotaExceeded, 409, "invalid_request_error", "voice_quota_exceeded"),
    (StoreUnavailable, 503, "server_error", "store_unavailable"),
    (InputError, 400, "invalid_request_error", "invalid_input"),
    (BackendUnavailable, 503, "server_error", "llm_unavailable"),
    (ModelError, 500, "model_error", "model_failed"),
    (CacheError, 500, "server_error", "cache_error"),
)


def studio_error_status(exc: StudioError) -> tuple[int, str, str | None]:
    """(status, type, code) for a studio error."""
    return next((row[1:] for row in _ERROR_STATUS if isinstance(exc, row[0])), (500, "server_error", None))


def install_error_handlers(app) -> None:
    """JSON bodies for every error our routes raise (the mounted Gradio app keeps its own)."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.type, exc.code, request_id(request), exc.headers)

    @app.exception_handler(StudioError)
    async def _studio_error(request: Request, exc: StudioError):
        status, type_, code = studio_error_status(exc)
        headers = {"Retry-After": str(int(math.ceil(exc.retry_after)))} \
            if isinstance(exc, (BackendUnavailable, StoreUnavailable)) else None
        return error_response(status, str(exc), type_, code, request_id(request), headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        # Name the fields and say what is wrong, without echoing pydantic internals or the input.
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path"))
            problems.append(f"{where or 'request'}: {err.get('msg', 'invalid')}")
        return error_response(400, "invalid request: " + "; ".join(problems), "invalid_request_error",
                              "invalid_request", request_id(request))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(exc.status_code, str(exc.detail), "invalid_request_error", code, request_id(request),
                              getattr(exc, "headers", None))


# ----------------------------------------------------------------------------- engine calls

class InternalError(Exception):
    """An unexpected failure inside an engine call, already logged with its traceback under ``request_id``."""

    def __init__(self, request_id: str) -> None:
        super().__init__(f"internal error; the server log has the details (request id {request_id})")
        self.request_id = request_id


def run_engine_call(metrics: Metrics, endpoint: str, rid: str, call: Callable[[], T]) -> T:
    """Run ``call`` (an engine method) for the API or the page: the one place it is counted, timed and
    logged (one INFO ``timing`` line naming ``rid``, the id the client sees).

    Raises:
        StudioError: passed through (the edge shows its message). InternalError: anything else,
            logged here with its traceback.
    """
    with metrics.track(endpoint):
        try:
            result = call()
        except (StudioError, StreamCancelled):
            raise
        except Exception:
            log.exception("request %s (%s) failed", rid, endpoint)
            raise InternalError(rid) from None
    # An engine call may return several results (one per edit pass): one timing line each. A whole
    # file's first audio is all of it, so its ttfa_ms is its total.
    items = []
    for item in result if isinstance(result, tuple) else (result,):
        timings = getattr(item, "timings", None)
        if isinstance(item, Result) and "ttfa_ms" not in timings.counters:
            timings = timings.with_counter("ttfa_ms", timings.total_ms)
            item = dataclasses.replace(item, timings=timings)
        if timings is not None:
            metrics.observe_timings(endpoint, timings)
            log.info(timings.log_line(endpoint, rid))
        items.append(item)
    result = tuple(items) if isinstance(result, tuple) else items[0]
    return result


def run_engine(request: Request, endpoint: str, call: Callable[[], T]) -> T:
    """:func:`run_engine_call` for an HTTP route: unexpected errors become a 500 naming the request id.
    The call runs under the request's cancel token (``web.admission``): a client that went away or a
    passed deadline stops the engine's work (then: 503 ``deadline_exceeded``, or 499 that nobody reads)."""
    state = request.scope.get("state", {})
    try:
        with cancellable(state.get("cancel")):
            return run_engine_call(get_metrics(request), endpoint, request_id(request), call)
    except InternalError as exc:
        raise APIError(500, str(exc), "server_error", "internal_error") from None
    except StreamCancelled:
        raise cancelled_error(request) from None


def cancelled_error(request) -> APIError:
    """The answer to a request whose engine work was cancelled (by its deadline or its client leaving)."""
    state = request.scope.get("state", {})
    if state.get("deadline_passed"):
        settings = get_settings(request)
        return APIError(503, f"the request took longer than its deadline of {settings.request_timeout_s:g} s "
                             "(setting request_timeout_s) and was cancelled; try a shorter text or retry later",
                        "server_error", "deadline_exceeded", headers={"Retry-After": str(settings.busy_retry_after_s)})
    return APIError(499, "the client closed the request; its work was cancelled", "invalid_request_error",
                    "client_closed")


def link_cancel(request, stream):
    """``stream`` (a ``ResultStream``), cancelled with the request's token (client gone, deadline)."""
    token = request.scope.get("state", {}).get("cancel")
    if token is not None:
        token.on_cancel(stream.cancel)
    return stream


def result_headers(result: Result, engine: Engine) -> dict[str, str]:
    """Headers every audio response carries."""
    return {"X-Timings": result.timings.to_header(), "X-Seed": str(result.seed),
            "X-Cache-Hits": ",".join(sorted(result.cache_hits)),
            "X-Engine": engine.describe().name.encode("ascii", "replace").decode()}


# ----------------------------------------------------------------------------- middleware

class StudioMiddleware:
    """Pure ASGI middleware (it must not buffer Gradio's streams): a request id on every HTTP
    request and response, and a JSON 500 for exceptions no handler caught. (Body limits and the
    cross-origin check are ``web.guards``.)"""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = secrets.token_hex(6)
        scope.setdefault("state", {})["request_id"] = rid

        started = False

        async def send_with_id(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers") or [])
                if not any(k.lower() == b"x-request-id" for k, _ in headers):
                    headers.append((b"x-request-id", rid.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # What no handler expected: log it, and (if nothing was sent yet) answer a JSON 500 naming
            # the request id instead of Starlette's plain-text one; the connection stays usable.
            log.exception("request %s (%s %s) failed", rid, scope.get("method"), scope["path"])
            if started:
                raise
            await _send_json(send, 500, {"error": {
                "message": f"internal error; the server log has the details (request id {rid})",
                "type": "server_error", "code": "internal_error", "request_id": rid}}, rid)


async def _send_json(send, status: int, payload: dict, rid: str, close: bool = False,
                     extra: list[tuple[bytes, bytes]] = ()) -> None:
    """A whole JSON response through a raw ASGI ``send`` (``extra``: more headers)."""
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"x-request-id", rid.encode()),
               (b"content-length", str(len(body)).encode()), *extra]
    if close:  # the unread body must not be taken for the next request
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def read_upload(upload, settings: Settings, what: str = "upload") -> bytes:
    """The bytes of an uploaded file, refusing more than ``settings.max_upload_bytes`` (413)."""
    limit = settings.max_upload_bytes
    data = upload.file.read(limit + 1)
    if len(data) > limit:
        raise APIError(413, f"the {what} is larger than the limit of {limit} bytes", "invalid_request_error",
                       "payload_too_large")
    if not data:
        raise APIError(400, f"the {what} is empty", "invalid_request_error", "invalid_input")
    return data


def jsonable(value):
    """``value`` with non-finite floats replaced by None (JSON has no NaN), e.g. cache stats."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
