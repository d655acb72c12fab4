"""Audio sent over HTTP while it is being generated.

Owns: the streamable formats (``pcm``: headerless 16-bit little-endian mono; ``wav``: a 44-byte
header whose RIFF and data sizes say "unknown" (0xFFFFFFFF), then the same samples), the SSE
framing of OpenAI's speech events (``speech.audio.delta`` with base64 audio, ``speech.audio.done``
with usage and, as our addition, timings and seed), ``start_stream`` (the first chunk is made
before any byte is sent, so bad input still answers a JSON 4xx) and ``stream_response`` (the body:
a client that goes away cancels the engine's stream, which frees its LLM slot; the request's
metrics and its timing log line are written when the stream ends, including ``ttfa_ms``).
Does not own: the routes and their validation (``web.api``), the engines' streaming
(``tts_engine/contract.py``).

Why a response class of our own: Starlette only watches for a disconnect on ASGI < 2.4 servers;
``CancellableStreamingResponse`` always listens, so a dropped client stops the work at once.
"""

from __future__ import annotations

import base64
import json
import logging
import struct
import time

import anyio
import numpy as np
from fastapi import Request
from starlette.responses import StreamingResponse

from core.audio_io import Audio, media_type
from core.errors import InputError, StudioError
from tts_engine.contract import Engine, ResultStream, StreamCancelled
from web.deps import APIError, cancelled_error, get_metrics, request_id

log = logging.getLogger(__name__)

STREAM_FORMATS = ("pcm", "wav")
_UNKNOWN = 0xFFFFFFFF


def check_stream_format(fmt: str) -> str:
    if fmt not in STREAM_FORMATS:
        raise InputError(f"response_format {fmt!r} cannot be streamed; with stream_format use one of "
                         f"{', '.join(STREAM_FORMATS)} (or leave stream_format out for a whole {fmt} file)")
    return fmt


def wav_stream_header(sample_rate: int) -> bytes:
    """A 16-bit mono WAV header for a stream of unknown length (sizes 0xFFFFFFFF, as players expect)."""
    return (b"RIFF" + struct.pack("<I", _UNKNOWN) + b"WAVEfmt " +
            struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16) +
            b"data" + struct.pack("<I", _UNKNOWN))


def pcm_bytes(audio: Audio) -> bytes:
    """Samples as 16-bit little-endian PCM (the same conversion as ``encode_audio(..., "pcm")``)."""
    return (np.clip(audio.samples, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def sse_event(payload: dict) -> bytes:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


class CancellableStreamingResponse(StreamingResponse):
    """A ``StreamingResponse`` that stops its body as soon as the client disconnects, whatever the
    ASGI version (the body's async generator is cancelled; it cancels the engine's stream)."""

    async def __call__(self, scope, receive, send) -> None:
        async with anyio.create_task_group() as group:

            async def body() -> None:
                try:
                    await self.stream_response(send)
                except OSError:   # the connection broke while sending
                    pass
                group.cancel_scope.cancel()

            group.start_soon(body)
            await self.listen_for_disconnect(receive)
            group.cancel_scope.cancel()


def start_stream(request: Request, endpoint: str, make) -> tuple[ResultStream, Audio]:
    """Create an engine stream and produce its first chunk (validation happens here, before any byte
    is sent, so errors answer as JSON like every other request). Runs in the route's worker thread."""
    stream: ResultStream = make()
    try:
        first = next(stream)
    except StopIteration:
        raise APIError(500, "the engine produced no audio", "server_error", "internal_error") from None
    except StreamCancelled:   # the client left or the deadline passed before the first chunk
        get_metrics(request).requests.labels(endpoint, "cancelled").inc()
        raise cancelled_error(request) from None
    except StudioError as exc:
        get_metrics(request).requests.labels(endpoint, type(exc).__name__).inc()
        raise
    except Exception:
        rid = request_id(request)
        log.exception("request %s (%s) failed", rid, endpoint)
        get_metrics(request).requests.labels(endpoint, "internal_error").inc()
        raise APIError(500, f"internal error; the server log has the details (request id {rid})",
                       "server_error", "internal_error") from None
    return stream, first


def _next_chunk(stream: ResultStream) -> Audio | None:
    try:
        return next(stream)
    except StopIteration:
        return None


def stream_response(request: Request, endpoint: str, engine: Engine, stream: ResultStream, first: Audio, fmt: str,
                    sse: bool, input_tokens: int = 0, score=None) -> CancellableStreamingResponse:
    """The streaming HTTP response for ``stream`` whose first chunk is ``first``. ``score(result)``, when
    given, returns the whole take's ``quality.report.QualityReport`` (in the SSE done event and /metrics)."""
    metrics = get_metrics(request)
    rid = request_id(request)
    started = time.perf_counter()
    rate = stream.sample_rate

    def encode(audio: Audio, header: bool) -> bytes:
        data = pcm_bytes(audio)
        if header and fmt == "wav":
            data = wav_stream_header(rate) + data
        return data

    def frame(data: bytes) -> bytes:
        return sse_event({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()}) if sse else data

    async def body():
        status = "ok"
        metrics.inflight.inc()
        try:
            yield frame(encode(first, header=True))
            while True:
                chunk = await anyio.to_thread.run_sync(_next_chunk, stream, abandon_on_cancel=True)
                if chunk is None:
                    break
                yield frame(encode(chunk, header=False))
            result = stream.result
            metrics.observe_timings(endpoint, result.timings)
            log.info(result.timings.log_line(endpoint, rid))
            report = None
            if score is not None:
                report = await anyio.to_thread.run_sync(score, result)
                metrics.observe_quality(endpoint, report)
            if sse:
                tokens = len(result.tokens)
                done = {"type": "speech.audio.done",
                        "usage": {"input_tokens": input_tokens, "output_tokens": tokens,
                                  "total_tokens": input_tokens + tokens},
                        "seed": result.seed, "timings": result.timings.as_dict()}
                if report is not None:
                    done["quality"] = report.as_dict()
                yield sse_event(done)
        except StreamCancelled:
            status = "cancelled"
        except BaseException as exc:
            stream.cancel()
            if isinstance(exc, (anyio.get_cancelled_exc_class(), GeneratorExit)):
                status = "disconnected"
                log.info("request %s (%s): the client went away; generation cancelled", rid, endpoint)
                raise
            status = type(exc).__name__
            if isinstance(exc, StudioError):
                message = str(exc)
            else:
                log.exception("request %s (%s) failed while streaming", rid, endpoint)
                message = f"internal error; the server log has the details (request id {rid})"
            if sse:   # the status line is gone; an error event is the only way to say it
                yield sse_event({"type": "error", "error": {"message": message, "request_id": rid}})
        finally:
            stream.cancel() if not stream.done else None
            metrics.inflight.dec()
            metrics.requests.labels(endpoint, status).inc()
            metrics.latency.labels(endpoint).observe(time.perf_counter() - started)

    headers = {"X-Seed": str(stream.seed), "X-Engine": engine.describe().name.encode("ascii", "replace").decode(),
               "X-Sample-Rate": str(rate), "Cache-Control": "no-store"}
    media = "text/event-stream" if sse else media_type(fmt)
    return CancellableStreamingResponse(body(), media_type=media, headers=headers)
