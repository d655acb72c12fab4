"""``WS /v1/audio/speech/stream``: text streamed in (e.g. an LLM's tokens), speech streamed out.

Owns: the session protocol (messages, events, close codes; docs/api.md "Text-in streaming"), the
handshake checks (API key from the ``Authorization`` header or a ``bearer.<key>`` subprotocol, the
``Origin`` check, the session admission hook), one session's tasks (receiver, speaker, sender) and its
limits (session length and text, the bounded send buffer); ``GET /stream-demo``, a static page whose
typing streams to a voice (``web/stream_demo.html``).
Does not own: cutting the text (``tts_engine/text_segmenter.py``), generating audio (each segment is an
ordinary ``Engine.clone_stream``, then ``edit_stream`` per edit), stored voices (``web.voices``), audio
encodings (``core.audio_io``, ``web.streaming``).

A session: the client sends ``session.open`` (voice, format, seed, instructions), then ``text`` deltas,
then ``close`` (or ``flush`` at any time, ``cancel`` to stop). The receiver cuts segments as soon as they
are safe; the speaker speaks them one after another, each through the engine's streaming path with seed
``seed + index``, so a segment's audio is that of ``POST /v1/audio/speech`` with the segment's text and
seed. Events (JSON text frames) and audio (binary frames) leave through one queue, so their order is the
order of the speech. A ``cancel``, a disconnect, a protocol error or a limit cancels the segment being
spoken (its LLM rows are freed at the backend's next step) and drops the rest.

Why these choices: browsers cannot set headers on a WebSocket, so the key may come as a subprotocol
(never a query parameter: those end up in access logs); a handshake is a cross-site-able GET, so the
``Origin`` is checked as ``web.guards.OriginGuard`` checks state-changing requests; a client that stops
reading would otherwise pin the audio in memory, so queued bytes are bounded (``ws_send_buffer_bytes``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import math
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import anyio
from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.audio_io import Audio, encode_audio, load_audio
from core.edit_options import tag_warning
from core.errors import InputError, StudioError
from core.instructions import EditStep, parse_instructions
from core.settings import QUALITY_CHECKS as CHECKS
from core.settings import Settings
from tts_engine.contract import CloneOptions, Engine, ResultStream, StreamCancelled, new_seed, validate_edit
from tts_engine.text_segmenter import Segment, TextSegmenter
from web.deps import studio_error_status
from web.guards import OriginGuard
from web.quality_http import get_scorer
from web.streaming import pcm_bytes, wav_stream_header
from web.voices import check_voice_id

log = logging.getLogger(__name__)

PATH = "/v1/audio/speech/stream"
SUBPROTOCOL = "step-audio.v1"          # offer it (with bearer.<key>) from a browser; it is echoed back
KEY_SUBPROTOCOL_PREFIX = "bearer."
FORMATS = ("pcm", "wav", "opus")
ENDPOINT = "speech_ws"                 # metrics and timing-line label

# Close codes (RFC 6455 section 7.4; 4000-4999 are the application's own).
CLOSE_DONE = 1000            # finished after "close", or cancelled
CLOSE_BINARY = 1003          # a binary frame: this endpoint takes JSON text frames only
CLOSE_INVALID = 1007         # a message that is not valid (JSON, type, fields, voice, text after close)
CLOSE_POLICY = 1008          # a limit: session time or total text
CLOSE_ERROR = 1011           # the engine failed, or an internal error
CLOSE_BUSY = 1013            # too many sessions: try again later
CLOSE_SLOW_CLIENT = 4000     # the client did not read its audio: the send buffer filled
CLOSE_GRACE_S = 20.0         # how long the last events and the close frame may wait for a client to read

router = APIRouter()
DEMO_PAGE = Path(__file__).with_name("stream_demo.html")


class SessionOpen(BaseModel):
    """The first message of a session."""

    model_config = ConfigDict(extra="forbid")

    type: str = Field(..., pattern="^session.open$")
    voice: str | dict = Field(..., description='a stored voice id, {"id": ...}, or {"audio": base64 clip, '
                                               '"transcript": what it says}')
    response_format: str = Field("pcm", description="pcm (16-bit LE mono), wav (a streaming header, then pcm) or "
                                                    "opus (each audio frame one Ogg Opus file)")
    seed: int | None = Field(None, description="segment i uses seed + i; omitted or negative: random")
    instructions: str | None = Field(None, description="edits applied to every segment, e.g. 'sad, whisper'")
    flow_steps: int | None = Field(None, description="flow-matching Euler steps (1..50)")
    quality: list[str] | None = Field(None, description="checks scored on every segment, reported in its "
                                      "segment.end (signal, content, speaker); omitted: the server's "
                                      "quality_checks this engine can run; []: none")


@dataclass(frozen=True)
class _Job:
    """A segment to speak, with the edits in force when it was cut."""

    segment: Segment
    steps: tuple[EditStep, ...]


class _Close(Exception):
    """Ends a session: an optional error event, then a close frame."""

    def __init__(self, code: int, error: str | None = None, message: str = "", event: dict | None = None) -> None:
        super().__init__(message or error or "")
        self.code, self.error, self.message, self.event = code, error, message, event


class _Disconnected(Exception):
    """The client went away."""


# ----------------------------------------------------------------------------- handshake

def _offered_key(websocket: WebSocket) -> str | None:
    scheme, _, token = websocket.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    for protocol in websocket.scope.get("subprotocols") or ():
        if protocol.startswith(KEY_SUBPROTOCOL_PREFIX):
            return protocol[len(KEY_SUBPROTOCOL_PREFIX):]
    return None


async def _refuse(websocket: WebSocket, status: int, code: str, message: str) -> None:
    """Refuse the handshake: an HTTP error with our JSON body where the server can send one, else 403."""
    body = {"error": {"message": message, "type": "invalid_request_error", "code": code}}
    try:
        await websocket.send_denial_response(JSONResponse(body, status_code=status))
    except RuntimeError:   # no denial-response extension: the plain refusal
        await websocket.close(code=CLOSE_POLICY)


def admit_session(websocket: WebSocket, settings: Settings) -> str:
    """The session admission (one call site): "" when a session may start, else why not.

    A session counts against ``ws_max_sessions`` and holds one slot of the server-wide engine admission
    (``web.admission``, setting ``max_engine_requests``) while it is open, so text streams and HTTP engine
    requests share one bound. The count lives in ``app.state`` and is touched only on the event loop."""
    state = websocket.app.state
    if getattr(state, "ws_sessions", 0) >= settings.ws_max_sessions:
        return (f"{settings.ws_max_sessions} text-streaming sessions are open (setting ws_max_sessions); "
                "try again later")
    admission = getattr(state, "admission", None)
    if admission is not None and not admission.try_acquire():
        return (f"the studio is busy: {admission.limit} engine requests are running (setting "
                f"max_engine_requests); retry in {admission.retry_after_s} s")
    state.ws_sessions = getattr(state, "ws_sessions", 0) + 1
    return ""


def _release_session(websocket: WebSocket) -> None:
    state = websocket.app.state
    state.ws_sessions -= 1
    if getattr(state, "admission", None) is not None:
        state.admission.release()


@router.get("/stream-demo", include_in_schema=False)
def stream_demo() -> FileResponse:
    """A static page whose typing streams to a voice (no server data in it; the WebSocket checks the key)."""
    return FileResponse(DEMO_PAGE, media_type="text/html")


@router.websocket(PATH)
async def speech_stream(websocket: WebSocket) -> None:
    app = websocket.app
    settings: Settings = app.state.settings
    if settings.api_key:
        key = _offered_key(websocket)
        if key is None or not secrets.compare_digest(key.encode(), settings.api_key.encode()):
            await _refuse(websocket, 401, "invalid_api_key", "missing or wrong API key: send 'Authorization: "
                          f"Bearer <key>' or the subprotocols '{SUBPROTOCOL}' and '{KEY_SUBPROTOCOL_PREFIX}<key>'")
            return
    if not OriginGuard(None, settings.cors_origin_list).allows(websocket.scope):
        log.warning("refused a cross-origin WebSocket from %r", websocket.headers.get("origin"))
        await _refuse(websocket, 403, "cross_origin_refused", "cross-origin WebSocket refused; browsers may open "
                      "it only from this server's own origin or one listed in cors_origins")
        return
    offered = websocket.scope.get("subprotocols") or ()
    await websocket.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
    refused = admit_session(websocket, settings)
    if refused:
        await websocket.send_json({"type": "error", "error": {"code": "too_many_sessions", "message": refused}})
        await websocket.close(CLOSE_BUSY, "too many sessions")
        return
    released = False

    def release() -> None:   # once the session's generation has stopped (the close may still wait)
        nonlocal released
        if not released:
            released = True
            _release_session(websocket)

    try:
        await _Session(websocket, app.state.engine, settings, app.state.voices, app.state.metrics, release).run()
    finally:
        release()


# ----------------------------------------------------------------------------- one session

class _Session:
    """One connection's state and tasks (see the module docstring)."""

    def __init__(self, websocket: WebSocket, engine: Engine, settings: Settings, voices, metrics,
                 release=lambda: None) -> None:
        self.ws, self.engine, self.settings, self.voices, self.metrics = websocket, engine, settings, voices, metrics
        self.release = release
        self.id = secrets.token_hex(6)
        self.started = time.monotonic()
        self.deadline = self.started + settings.ws_max_session_s
        self.segmenter = TextSegmenter(settings.text_chunk_chars, settings.ws_clause_min_chars,
                                       settings.ws_segment_max_wait_ms / 1000.0, settings.ws_max_session_chars)
        self.jobs: asyncio.Queue[_Job | None] = asyncio.Queue()
        self.out: asyncio.Queue = asyncio.Queue()   # ("text", str) | ("bytes", bytes) | ("close", code, reason)
        self.queued_bytes = 0
        self.steps: tuple[EditStep, ...] = ()
        self.closing = False             # the client sent "close"
        self.current: ResultStream | None = None
        self.cancelled = False
        self.spoken_segments = 0
        self.audio_samples = 0
        self.fmt = "pcm"
        self.seed = 0
        self.checks: frozenset[str] = frozenset()   # quality checks scored on each segment (docs/quality.md)
        self.scorer = self.reference = None

    # ------------------------------------------------------------------ top level

    async def run(self) -> None:
        sender = asyncio.create_task(self._sender())
        speaker: asyncio.Task | None = None
        status = "ok"
        try:
            await self._open()
            speaker = asyncio.create_task(self._speaker())
            await self._receive(speaker)
            self._send_event({"type": "session.done", "segments": self.spoken_segments,
                              "audio_s": round(self.audio_samples / self.engine.describe().sample_rate, 3),
                              "chars": len(self.segmenter.text)})
            self._send_close(CLOSE_DONE, "done")
        except _Close as end:
            status = end.error or "cancelled"
            self._stop_generation()
            if end.code == CLOSE_SLOW_CLIENT:
                self._drop_queued_audio()
            if end.event is not None:
                self._send_event(end.event)
            elif end.error:
                self._send_event({"type": "error", "error": {"code": end.error, "message": end.message,
                                                             "session_id": self.id}})
            self._send_close(end.code, (end.error or "cancelled")[:120])
        except _Disconnected:
            status = "disconnected"
            self._stop_generation()
            log.info("text-streaming session %s: the client went away; generation cancelled", self.id)
        except Exception:
            status = "internal_error"
            self._stop_generation()
            log.exception("text-streaming session %s failed", self.id)
            self._send_event({"type": "error", "error": {"code": "internal_error", "session_id": self.id,
                                                         "message": "internal error; the server log has the "
                                                                    f"details (session id {self.id})"}})
            self._send_close(CLOSE_ERROR, "internal error")
        finally:
            if speaker is not None:
                speaker.cancel()
                await asyncio.gather(speaker, return_exceptions=True)
            self.release()
            if status == "disconnected":
                sender.cancel()
            else:
                self.out.put_nowait(None)
            try:
                await asyncio.wait_for(asyncio.gather(sender, return_exceptions=True), CLOSE_GRACE_S)
            except TimeoutError:   # the client reads nothing, not even the close frame
                sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)
            self.metrics.requests.labels(ENDPOINT, status).inc()
            self.metrics.latency.labels(ENDPOINT).observe(time.monotonic() - self.started)
            log.info("text-streaming session %s ended (%s): %d segments, %.2f s of audio, %d characters", self.id,
                     status, self.spoken_segments, self.audio_samples / self.engine.describe().sample_rate,
                     len(self.segmenter.text))

    def _stop_generation(self) -> None:
        """Cancel the segment being spoken (its LLM rows leave at the backend's next step) and drop the rest."""
        self.cancelled = True
        if self.current is not None:
            self.current.cancel()
        while not self.jobs.empty():
            self.jobs.get_nowait()

    # ------------------------------------------------------------------ receiving

    async def _message(self, timeout: float | None) -> dict:
        """The next JSON message, within ``timeout`` seconds (TimeoutError)."""
        message = await asyncio.wait_for(self.ws.receive(), timeout)
        return self._parse(message)

    def _parse(self, message) -> dict:
        if message["type"] == "websocket.disconnect":
            raise _Disconnected()
        if message.get("text") is None:
            raise _Close(CLOSE_BINARY, "binary_frame", "this endpoint takes JSON text frames only; audio comes "
                                                       "from the server, text goes to it as JSON")
        try:
            data = json.loads(message["text"])
        except ValueError:
            raise _Close(CLOSE_INVALID, "invalid_json", "a message is not JSON") from None
        if not isinstance(data, dict) or not isinstance(data.get("type"), str):
            raise _Close(CLOSE_INVALID, "invalid_message", 'every message is a JSON object with a "type"')
        return data

    async def _open(self) -> None:
        try:
            data = await self._message(max(0.0, self.deadline - time.monotonic()))
        except TimeoutError:
            raise _Close(CLOSE_POLICY, "session_too_long", "no session.open within the session time limit") from None
        try:
            opening = SessionOpen.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())) or 'message'}: {e.get('msg')}"
                                 for e in exc.errors())
            raise _Close(CLOSE_INVALID, "invalid_open", f"the first message must be session.open: {problems}") \
                from None
        try:
            prompt, transcript = await anyio.to_thread.run_sync(self._voice, opening.voice)
            if opening.response_format not in FORMATS:
                raise InputError(f"response_format {opening.response_format!r} cannot be streamed here; use one of "
                                 f"{', '.join(FORMATS)}")
            self.options = CloneOptions(flow_steps=opening.flow_steps)
            self.steps = self._instructions(opening.instructions)
            self._quality(opening.quality, prompt)
            # The prompt's work (a cache hit for a stored voice) is done now, not in the first segment's latency.
            await anyio.to_thread.run_sync(self.engine.prepare_prompt, prompt)
        except StudioError as exc:
            _, _, code = studio_error_status(exc)
            raise _Close(CLOSE_INVALID if isinstance(exc, InputError) else CLOSE_ERROR, code or "error", str(exc)) \
                from None
        self.prompt, self.transcript = prompt, transcript
        self.fmt, self.seed = opening.response_format, new_seed(opening.seed)
        rate = self.engine.describe().sample_rate
        self._send_event({"type": "session.started", "session_id": self.id, "sample_rate": rate,
                          "response_format": self.fmt, "seed": self.seed, "engine": self.engine.describe().name,
                          "instructions": [step.label for step in self.steps]})
        if self.fmt == "wav":
            self._send_bytes(wav_stream_header(rate))

    def _quality(self, asked: list[str] | None, prompt: Audio) -> None:
        """The checks scored on every segment: those asked for (refused at open when this engine cannot
        run them), else the server's defaults that it can run, as for ``POST /v1/audio/speech``."""
        scorer = get_scorer(self.ws)
        if asked is None:
            checks = frozenset(self.settings.quality_check_list) & scorer.available_checks()
        else:
            checks = frozenset(asked)
            unknown = checks - set(CHECKS)
            if unknown:
                raise InputError(f"quality may name {', '.join(CHECKS)}, not {', '.join(sorted(unknown))}")
            scorer.check_available(checks)
        if checks:
            self.checks, self.scorer, self.reference = checks, scorer, scorer.reference(prompt)

    def _voice(self, voice) -> tuple[Audio, str]:
        """(prompt clip, its transcript) of the open message's voice. Runs in a worker thread."""
        if isinstance(voice, dict) and "audio" in voice:
            encoded, transcript = voice.get("audio"), voice.get("transcript")
            if not isinstance(encoded, str) or not isinstance(transcript, str) or not transcript.strip():
                raise InputError('an inline voice is {"audio": "<base64 clip>", "transcript": "what it says"}')
            if len(encoded) > math.ceil(self.settings.max_upload_bytes / 3) * 4:
                raise InputError(f"the voice clip is larger than the limit of {self.settings.max_upload_bytes} bytes")
            try:
                data = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                raise InputError("voice.audio is not base64") from None
            return load_audio(data, max_seconds=self.settings.max_prompt_seconds), transcript
        voice_id = voice.get("id") if isinstance(voice, dict) else voice
        if not isinstance(voice_id, str):
            raise InputError('voice must be a stored voice id, {"id": "<voice id>"} or {"audio": ..., "transcript": ...}')
        stored = self.voices.get(check_voice_id(voice_id))
        return self.voices.audio(stored.id), stored.transcript

    def _instructions(self, text: str | None) -> tuple[EditStep, ...]:
        steps = parse_instructions(text)
        caps = self.engine.capabilities()
        for step in steps:   # refuse an edit the engine cannot do before anything is spoken
            validate_edit(step.edit_type, step.edit_info, caps)
        return steps

    async def _receive(self, speaker: asyncio.Task) -> None:
        """Read messages until the speaker has said everything after "close" (returns), or the session ends
        otherwise (raises ``_Close`` / ``_Disconnected``)."""
        receiving: asyncio.Task | None = None
        try:
            while True:
                if receiving is None:
                    receiving = asyncio.create_task(self.ws.receive())
                now = time.monotonic()
                wake = min(d for d in (self.deadline, self.segmenter.deadline) if d is not None)
                done, _ = await asyncio.wait({receiving, speaker}, timeout=max(0.0, wake - now),
                                             return_when=asyncio.FIRST_COMPLETED)
                now = time.monotonic()
                if receiving in done:
                    message, receiving = receiving.result(), None
                    self._handle(self._parse(message), now)
                if speaker in done:
                    speaker.result()        # its _Close (an engine error, a slow client) ends the session
                    return
                if now >= self.deadline:
                    raise _Close(CLOSE_POLICY, "session_too_long", f"the session was open for "
                                 f"{self.settings.ws_max_session_s:g} s, the limit (setting ws_max_session_s)")
                self._queue(self.segmenter.due(now))
        finally:
            if receiving is not None:
                receiving.cancel()

    def _handle(self, data: dict, now: float) -> None:
        kind = data["type"]
        if kind == "cancel":
            raise _Close(CLOSE_DONE, None, event={"type": "session.cancelled", "session_id": self.id})
        if self.closing and kind in ("text", "flush", "options", "close"):
            raise _Close(CLOSE_INVALID, "text_after_close", f"a {kind} message after close; open a new session")
        if kind == "text":
            text = data.get("text")
            if not isinstance(text, str):
                raise _Close(CLOSE_INVALID, "invalid_message", 'a text message is {"type": "text", "text": "..."}')
            try:
                self._queue(self.segmenter.push(text, now))
            except InputError as exc:
                raise _Close(CLOSE_POLICY, "session_text_too_long", str(exc)) from None
        elif kind == "flush":
            self._queue(self.segmenter.flush())
        elif kind == "options":
            try:
                self.steps = self._instructions(data.get("instructions"))
            except InputError as exc:
                raise _Close(CLOSE_INVALID, "invalid_input", str(exc)) from None
        elif kind == "close":
            self.closing = True
            self._queue(self.segmenter.flush())
            self.jobs.put_nowait(None)
        else:
            raise _Close(CLOSE_INVALID, "invalid_message", f"unknown message type {kind!r}; use text, flush, options, "
                                                           "close or cancel")

    def _queue(self, segments: list[Segment]) -> None:
        for segment in segments:
            if warning := tag_warning(segment.spoken):
                self._send_event({"type": "warning", "index": segment.index, "message": warning})
            self.jobs.put_nowait(_Job(segment, self.steps))

    # ------------------------------------------------------------------ speaking

    async def _speaker(self) -> None:
        while (job := await self.jobs.get()) is not None:
            await self._speak(job)

    async def _speak(self, job: _Job) -> None:
        segment = job.segment
        seed = (self.seed + segment.index) % 2**31
        self._send_event({"type": "segment.start", "index": segment.index, "text": segment.text,
                          "spoken": segment.spoken, "start": segment.start, "end": segment.end,
                          "reason": segment.reason, "seed": seed, "instructions": [s.label for s in job.steps]})
        samples = 0
        try:
            stream = await anyio.to_thread.run_sync(self._edited_stream, segment.spoken, seed, job.steps,
                                                    abandon_on_cancel=True)
            while True:
                chunk = await anyio.to_thread.run_sync(_next_chunk, stream, abandon_on_cancel=True)
                if chunk is None:
                    break
                samples += chunk.samples.size
                self._send_audio(chunk)
            result = stream.result
        except StreamCancelled:   # only _stop_generation cancels, and the session is ending then
            return
        except StudioError as exc:
            _, _, code = studio_error_status(exc)
            raise _Close(CLOSE_INVALID if isinstance(exc, InputError) else CLOSE_ERROR, code or "error",
                         f"segment {segment.index}: {exc}") from None
        self.current = None
        self.spoken_segments += 1
        self.audio_samples += samples
        self.metrics.observe_timings(ENDPOINT, result.timings)
        log.info(result.timings.log_line(ENDPOINT, f"{self.id}.{segment.index}"))
        end = {"type": "segment.end", "index": segment.index, "samples": samples, "seed": result.seed,
               "timings": result.timings.as_dict()}
        if self.checks:   # scored once the segment's audio is all out, so it never delays a chunk
            report = await anyio.to_thread.run_sync(lambda: self.scorer.score(
                result.audio, segment.spoken, self.checks, self.reference, seed=result.seed))
            end["quality"] = report.as_dict()
        self._send_event(end)

    def _edited_stream(self, text: str, seed: int, steps: tuple[EditStep, ...]) -> ResultStream:
        """The stream whose chunks are the segment's audio: the clone's, or (with edits) the last edit's, the
        earlier steps run to the end first. Every stream is ``self.current`` while it runs, so a cancel stops
        it. Runs in a worker thread; edit seeds follow ``POST /v1/audio/speech`` (``seed + 1 + i``)."""
        stream = self._track(self.engine.clone_stream(self.prompt, self.transcript, text, seed=seed,
                                                      options=self.options))
        for i, step in enumerate(steps):
            for _ in stream:
                pass
            before = stream.result
            stream = self._track(self.engine.edit_stream(before.audio, before.text, step.edit_type, step.edit_info,
                                                         seed=(seed + 1 + i) % 2**31, options=self.options))
        return stream

    def _track(self, stream: ResultStream) -> ResultStream:
        self.current = stream
        if self.cancelled:   # cancelled while the previous step ran
            stream.cancel()
        return stream

    # ------------------------------------------------------------------ sending

    def _send_event(self, event: dict) -> None:
        self.out.put_nowait(("text", json.dumps(event, separators=(",", ":"), ensure_ascii=False)))

    def _send_bytes(self, data: bytes) -> None:
        self.queued_bytes += len(data)
        self.out.put_nowait(("bytes", data))

    def _send_audio(self, chunk: Audio) -> None:
        data = encode_audio(chunk, "opus") if self.fmt == "opus" else pcm_bytes(chunk)
        # One chunk always fits an empty buffer (the preview engine's chunk is a whole sentence).
        if self.queued_bytes and self.queued_bytes + len(data) > self.settings.ws_send_buffer_bytes:
            raise _Close(CLOSE_SLOW_CLIENT, "send_buffer_full",
                         f"{self.queued_bytes + len(data)} bytes of audio wait for the client to read them (limit "
                         f"{self.settings.ws_send_buffer_bytes}, setting ws_send_buffer_bytes); generation stopped")
        self._send_bytes(data)

    def _send_close(self, code: int, reason: str) -> None:
        self.out.put_nowait(("close", code, reason))

    def _drop_queued_audio(self) -> None:
        kept = []
        while not self.out.empty():
            item = self.out.get_nowait()
            if item is not None and item[0] != "bytes":
                kept.append(item)
        self.queued_bytes = 0
        for item in kept:
            self.out.put_nowait(item)

    async def _sender(self) -> None:
        """The only task that writes to the socket: frames leave in the order they were queued."""
        while (item := await self.out.get()) is not None:
            kind = item[0]
            try:
                if kind == "text":
                    await self.ws.send_text(item[1])
                elif kind == "bytes":
                    await self.ws.send_bytes(item[1])
                    self.queued_bytes -= len(item[1])
                else:
                    await self.ws.close(item[1], item[2])
                    return
            except (OSError, RuntimeError, WebSocketDisconnect) as exc:   # gone; the receiver sees the disconnect
                log.debug("text-streaming session %s: send failed (%s)", self.id, exc)
                return


def _next_chunk(stream: ResultStream) -> Audio | None:
    try:
        return next(stream)
    except StopIteration:
        return None
