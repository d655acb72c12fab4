"""HTTP routes for speech, edits, the prompt cache, the engine, health and metrics.

Owns: ``POST /v1/audio/speech`` (OpenAI compatible, ``instructions`` included),
``POST /v1/audio/edits`` (with ``iterations``), ``POST /v1/audio/transcriptions`` (OpenAI compatible),
``GET /v1/models``, ``GET /v1/engine``, ``GET /v1/cache/stats``, ``POST /v1/cache/clear``,
``GET /healthz``, ``GET /readyz``, ``GET /metrics``; their pydantic models.
Does not own: voices (``web.api_voices``), shared plumbing (``web.deps``).

Engine routes are plain ``def``: FastAPI runs them in its threadpool, so a long clone never
blocks the event loop (and the Gradio UI served by the same loop).

``speed``: the engine's speed edit is coarse (faster / slower / more faster / more slower) and
regenerates the audio, so it cannot honour an exact factor; any ``speed`` other than 1.0 is
refused with a 400 pointing at ``/v1/audio/edits`` (edit_type ``speed``).

``instructions`` ("whisper, sad, a bit slower") become an edit chain (``core.instructions``) that
is checked against the engine before anything runs and applied after the clone, in order; the
chain comes back in ``X-Edit-Chain``. Unknown tags in a text are not refused: ``X-Warning`` says
which (values are percent-encoded UTF-8, so a header stays ASCII).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Literal
from urllib.parse import quote

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field
from starlette.routing import Match

from core.audio_io import OUTPUT_FORMATS, encode_audio, load_audio, media_type
from core.devices import check_allocation
from core.edit_options import EDIT_TYPES, tag_warning
from core.errors import InputError
from core.instructions import chain_header, parse_instructions
from core.settings import Settings
from tts_engine.contract import CloneOptions, Engine, validate_edit, validate_iterations, validate_text
from userdata.db import Database
from web import api_productions, api_voices
from web.deps import APIError, get_db, get_engine, get_metrics, get_settings, get_voices, jsonable, link_cancel, read_upload, require_api_key, result_headers, run_engine
from web.long_edits import long_edit_response
from web.metrics import CONTENT_TYPE
from web.quality_http import QualityOptions, captioned_response, check_request, parse_form_options, quality_header, request_gates, run_gated
from web.streaming import check_stream_format, start_stream, stream_response
from web.voices import VoiceStore, check_voice_id

log = logging.getLogger(__name__)

MODEL_ID = "step-audio-editx"
MODEL_ALIASES = (MODEL_ID, "tts-1", "tts-1-hd", "gpt-4o-mini-tts")  # accepted so stock clients work unchanged

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])
ops_router = APIRouter()


class SpeechRequest(BaseModel):
    """OpenAI's speech request, plus ``seed`` and ``flow_steps``; unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(MODEL_ID, description=f"{MODEL_ID} (OpenAI names such as tts-1 are accepted as aliases)")
    input: str = Field(..., description="the text to speak")
    voice: str | dict = Field(..., description="a stored voice id (POST /v1/audio/voices), or {\"id\": ...}")
    response_format: str = Field("mp3", description="wav, flac, mp3, opus or pcm (16-bit LE mono at 24 kHz)")
    speed: float = Field(1.0, description="only 1.0; use /v1/audio/edits with edit_type=speed")
    instructions: str | None = Field(None, description="edits applied after the clone, e.g. 'whisper, sad, a bit "
                                                       "slower' or '耳语，难过，慢一点' (echoed in X-Edit-Chain)")
    stream_format: Literal["audio", "sse"] | None = Field(
        None, description="'audio' sends pcm or wav audio as it is generated; 'sse' sends speech.audio.delta "
                          "events (base64 audio) then speech.audio.done (usage, timings); omitted: one whole file")
    seed: int | None = Field(None, description="sampling seed; omitted or negative means random (reported in X-Seed)")
    flow_steps: int | None = Field(None, description="flow-matching Euler steps (1..50); default from settings")
    quality: QualityOptions | None = Field(None, description="checks, gates and best-of-N (docs/quality.md); "
                                                             "the scores come back in X-Quality")
    timestamps: bool = Field(False, description="answer JSON: base64 audio, word timestamps and the quality report")


def header_value(text: str) -> str:
    """``text`` as an ASCII header value: UTF-8 percent-encoding, readable punctuation kept."""
    return quote(text, safe=" []-_,.:;()'/?!=+*&")


def _audio_response(result, engine: Engine, fmt: str, audio=None, extra: dict[str, str] | None = None) -> Response:
    """The audio of ``result`` (or ``audio``, the end of a chain that began with ``result``)."""
    body = encode_audio(audio if audio is not None else result.audio, fmt)
    return Response(body, media_type=media_type(fmt), headers={**result_headers(result, engine), **(extra or {})})


def _check_format(fmt: str) -> str:
    if fmt not in OUTPUT_FORMATS:
        raise InputError(f"unsupported response_format {fmt!r}; choose one of {', '.join(OUTPUT_FORMATS)}")
    return fmt


@router.post("/audio/speech", summary="Speak text in a stored voice (OpenAI compatible)",
             response_class=Response, responses={200: {"content": {"audio/mpeg": {}, "audio/wav": {}}}})
def create_speech(body: SpeechRequest, request: Request, engine: Engine = Depends(get_engine),
                  voices: VoiceStore = Depends(get_voices), settings: Settings = Depends(get_settings)) -> Response:
    voice_id = body.voice.get("id") if isinstance(body.voice, dict) else body.voice
    if not isinstance(voice_id, str):
        raise InputError('voice must be a stored voice id (POST /v1/audio/voices) or {"id": "<voice id>"}')
    if body.model not in MODEL_ALIASES:
        raise InputError(f"unknown model {body.model!r}; use {MODEL_ID}")
    fmt = _check_format(body.response_format)
    if body.speed != 1.0:
        raise InputError(f"speed {body.speed:g} cannot be honoured exactly; generate at 1.0 and apply "
                         "POST /v1/audio/edits with edit_type=speed (faster, slower, more faster, more slower)")
    steps = parse_instructions(body.instructions)
    caps = engine.capabilities()
    for step in steps:  # refuse an edit the engine cannot do before the clone runs
        validate_edit(step.edit_type, step.edit_info, caps)
    if body.stream_format:
        check_stream_format(fmt)
        if steps:   # the edits need the whole clone first: nothing could be sent before the end
            raise InputError("instructions cannot be combined with stream_format: the edits apply to the whole "
                             "clone; leave stream_format out, or stream without instructions")
    text = validate_text(body.input, "input", settings.max_text_chars)
    gates, scorer = request_gates(request, body.quality)
    check_request(scorer, gates, body.timestamps)
    if body.stream_format and (gates.takes_at_most > 1 or body.timestamps):
        raise InputError("candidates, retries and timestamps need the whole take first; leave stream_format out")
    voice = voices.get(check_voice_id(voice_id))
    prompt = voices.audio(voice.id)
    options = CloneOptions(flow_steps=body.flow_steps)
    if body.stream_format:
        stream, first = start_stream(request, "speech_stream", lambda: link_cancel(request, engine.clone_stream(
            prompt, voice.transcript, text, seed=body.seed, options=options)))
        score = None
        if gates.active:   # scored once the whole take is there; the SSE done event carries it
            score = lambda result: scorer.score(result.audio, text, gates.checks, scorer.reference(prompt),  # noqa: E731
                                                max_error=gates.max_error, min_similarity=gates.min_similarity,
                                                seed=result.seed)
        return stream_response(request, "speech_stream", engine, stream, first, fmt, sse=body.stream_format == "sse",
                               input_tokens=len(text), score=score)
    gated = run_gated(request, "speech", lambda seed: engine.clone(prompt, voice.transcript, text, seed=seed,
                                                                   options=options),
                      lambda r: r.audio, text, gates, scorer, prompt, body.seed)
    result = gated.take
    extra = {**_warning_header(text), **(quality_header(gated) if gates.active else {})}
    audio = None
    if steps:
        edited = result
        for i, step in enumerate(steps):
            edited = run_engine(request, f"edit_{step.edit_type}", lambda step=step, i=i, source=edited: engine.edit(
                source.audio, result.text, step.edit_type, step.edit_info, seed=(result.seed + 1 + i) % 2**31,
                options=options))
        audio = edited.audio
        extra["X-Edit-Chain"] = chain_header(steps)
        if gates.active:   # the returned audio is the end of the chain: its scores, with the clone's takes
            report = scorer.score(audio, text, gates.checks, scorer.reference(prompt), max_error=gates.max_error,
                                  min_similarity=gates.min_similarity, seed=result.seed)
            gated = dataclasses.replace(gated, report=report)
            extra["X-Quality"] = gated.header()
    if body.timestamps:
        return captioned_response(audio if audio is not None else result.audio, fmt, gated, scorer,
                                  {**result_headers(result, engine), **extra})
    return _audio_response(result, engine, fmt, audio=audio, extra=extra)


def _warning_header(*texts: str | None) -> dict[str, str]:
    """``{"X-Warning": ...}`` naming unknown tags in ``texts`` (empty when every tag is known)."""
    warnings = [w for w in (tag_warning(t) for t in texts) if w]
    return {"X-Warning": header_value(" | ".join(warnings))} if warnings else {}


def _transcribe(request: Request, engine: Engine, audio, what: str) -> str:
    """What ``audio`` says, by the engine's ASR (for a clip that came without its text)."""
    transcript = run_engine(request, "transcribe", lambda: engine.transcribe(audio))
    log.info("%s transcribed by %s: %d characters", what, transcript.model or "the engine", len(transcript.text))
    return transcript.text


@router.post("/audio/edits", summary="Edit a clip: emotion, style, speed, paralinguistic, denoise, vad",
             response_class=Response)
def create_edit(request: Request,
                edit_type: str = Form(..., description="emotion, style, speed, paralinguistic, denoise or vad"),
                edit_info: str | None = Form(None, description="the option, e.g. happy (see GET /v1/engine)"),
                audio_text: str | None = Form(None, description="what the clip says (default: the voice's transcript; "
                                                                "for a file, the engine transcribes it)"),
                text: str | None = Form(None, description="paralinguistic only: the text with tags, e.g. [Laughter]"),
                file: UploadFile | None = File(None, description="the clip to edit (or give voice)"),
                voice: str | None = Form(None, description="edit a stored voice's clip instead of a file"),
                iterations: int = Form(1, description="apply the edit 1-5 times, each on the previous result "
                                                      "(stronger; whisper usually needs 2)"),
                seed: int | None = Form(None), flow_steps: int | None = Form(None),
                response_format: str = Form("wav"),
                quality: str | None = Form(None, description='JSON quality options, e.g. {"candidates": 2, '
                                                             '"checks": ["signal", "speaker"]} (docs/quality.md)'),
                engine: Engine = Depends(get_engine), voices: VoiceStore = Depends(get_voices),
                settings: Settings = Depends(get_settings)) -> Response:
    fmt = _check_format(response_format)
    iterations = validate_iterations(iterations)
    gates, scorer = request_gates(request, parse_form_options(quality))
    check_request(scorer, gates)
    if (file is None) == (voice is None):
        raise InputError("give exactly one of 'file' (an audio upload) or 'voice' (a stored voice id)")
    if file is not None:
        audio = load_audio(read_upload(file, settings, "audio file"), max_seconds=settings.max_edit_seconds)
        if audio.duration > settings.max_prompt_seconds:   # longer than one model call: in pieces (web.long_edits)
            return long_edit_response(request, engine, settings, audio, audio_text, edit_type, edit_info, text,
                                      iterations, seed, CloneOptions(flow_steps=flow_steps), fmt)
        if not (audio_text and audio_text.strip()):
            validate_edit(edit_type, edit_info or None, engine.capabilities())  # before transcribing
            audio_text = _transcribe(request, engine, audio, "the audio to edit")
    else:
        stored = voices.get(check_voice_id(voice))
        audio = voices.audio(stored.id)
        audio_text = audio_text or stored.transcript
    audio_text = validate_text(audio_text, "audio_text", settings.max_text_chars)
    if text is not None and text.strip():
        text = validate_text(text, "text", settings.max_text_chars)
    options = CloneOptions(flow_steps=flow_steps)
    spoken = text if edit_type == "paralinguistic" and text else audio_text
    gated = run_gated(request, f"edit_{edit_type}" if edit_type in EDIT_TYPES else "edit",
                      lambda s: engine.edit_iterations(audio, audio_text, edit_type, edit_info or None, text or None,
                                                       iterations=iterations, seed=s, options=options),
                      lambda rs: rs[-1].audio, spoken, gates, scorer, audio, seed)
    results = gated.take
    extra = {**_warning_header(text if edit_type == "paralinguistic" else None), "X-Iterations": str(len(results)),
             "X-Seed": str(results[0].seed),  # the first pass's seed repeats the whole chain
             **(quality_header(gated) if gates.active else {})}
    return _audio_response(results[-1], engine, fmt, extra=extra)


class TranscriptionModel(BaseModel):
    text: str


TRANSCRIPTION_FORMATS = ("json", "text", "verbose_json")


@router.post("/audio/transcriptions", summary="What a clip says, by the engine's ASR (OpenAI compatible)",
             response_model=TranscriptionModel, responses={200: {"content": {"text/plain": {}}}})
def create_transcription(request: Request, file: UploadFile = File(..., description="the clip (WAV, FLAC, OGG, MP3)"),
                         model: str = Form(MODEL_ID, description="ignored: the engine's own ASR model answers"),
                         response_format: str = Form(
                             "json", description="json, text, or verbose_json (with the duration, and words with "
                                                 "timestamp_granularities)"),
                         timestamp_granularities: list[str] | None = Form(
                             None, alias="timestamp_granularities[]",
                             description="word: each word's start and end in seconds (verbose_json only)"),
                         engine: Engine = Depends(get_engine), settings: Settings = Depends(get_settings)):
    if response_format not in TRANSCRIPTION_FORMATS:
        raise InputError(f"unsupported response_format {response_format!r}; choose {', '.join(TRANSCRIPTION_FORMATS)}")
    granularities = set(timestamp_granularities or ())
    if granularities - {"word", "segment"}:
        raise InputError("timestamp_granularities[] may be word or segment, not "
                         f"{', '.join(sorted(granularities - {'word', 'segment'}))}")
    if granularities and response_format != "verbose_json":
        raise InputError("timestamp_granularities[] needs response_format verbose_json")
    audio = load_audio(read_upload(file, settings, "audio file"), max_seconds=settings.max_prompt_seconds)
    transcript = run_engine(request, "transcribe", lambda: engine.transcribe(audio))
    headers = {"X-Timings": transcript.timings.to_header()}
    if response_format == "text":
        return Response(transcript.text, media_type="text/plain; charset=utf-8", headers=headers)
    if response_format == "json":
        return JSONResponse({"text": transcript.text}, headers=headers)
    body = {"task": "transcribe", "duration": round(audio.duration, 3), "text": transcript.text}
    if "word" in granularities:
        if not transcript.timed:
            raise InputError(f"the ASR model {transcript.model or 'of this engine'} gave no word timings for this clip")
        body["words"] = [w.as_dict() for w in transcript.words]
    if "segment" in granularities:   # no VAD runs: the clip is one segment
        body["segments"] = [{"id": 0, "start": 0.0, "end": round(audio.duration, 3), "text": transcript.text}]
    return JSONResponse(body, headers=headers)


@router.get("/models", summary="The model this server speaks with (OpenAI compatible)")
def list_models(engine: Engine = Depends(get_engine)) -> dict:
    info = engine.describe()
    return {"object": "list", "data": [{"id": MODEL_ID, "object": "model", "owned_by": "stepfun-ai",
                                        "engine": info.name, "preview": info.preview}]}


@router.get("/engine", summary="The loaded engine and the edits it can do")
def describe_engine(engine: Engine = Depends(get_engine)) -> dict:
    info = engine.describe()
    return {"name": info.name, "preview": info.preview, "device": info.device, "detail": info.detail,
            "sample_rate": info.sample_rate,
            "edits": [{"edit_type": c.edit_type, "options": list(c.options), "available": c.available,
                       "unavailable_options": list(c.unavailable_options), "note": c.note}
                      for c in engine.capabilities()]}


@router.get("/cache/stats", summary="Prompt cache statistics")
def cache_stats(engine: Engine = Depends(get_engine)) -> JSONResponse:
    # A read: no folder lock, no write of stats.json (the counters are flushed by writes and at exit).
    return JSONResponse(jsonable(engine.cache.snapshot()))


@router.post("/cache/clear", summary="Empty the prompt cache (stored voices stay; entries are recomputed)")
def cache_clear(engine: Engine = Depends(get_engine)) -> JSONResponse:
    engine.cache.clear()
    log.info("prompt cache cleared through the API")
    return JSONResponse({"cleared": True, "stats": jsonable(engine.cache.snapshot())})


# ----------------------------------------------------------------------------- operations (no key)
# These are ``async``: they never wait for a worker thread of AnyIO's pool, which engine routes may
# all hold. What can block (the readiness probe's CUDA check, a scrape) runs in the app's own small
# executor with a time limit, so a busy engine cannot make a health check time out.

OPS_TIMEOUT_S = 3.0   # under the image's 4 s healthcheck timeout


@ops_router.get("/healthz", summary="The process is up")
async def healthz() -> dict:
    return {"status": "ok"}


@ops_router.get("/readyz", summary="The configured engine is loaded (and, on CUDA, can allocate)")
async def readyz(request: Request) -> JSONResponse:
    engine, settings = get_engine(request), get_settings(request)
    try:
        ready, reason = await _off_loop(request, _readiness, engine, settings, get_db(request))
    except TimeoutError:
        ready, reason = False, f"the readiness check took longer than {OPS_TIMEOUT_S:g} s"
    except Exception as exc:  # a readiness probe answers, it never raises
        log.exception("readiness check failed")
        ready, reason = False, f"readiness check failed: {type(exc).__name__}"
    return JSONResponse({"ready": bool(ready), "reason": reason}, status_code=200 if ready else 503)


def _readiness(engine: Engine, settings: Settings, db: Database) -> tuple[bool, str]:
    ready, reason = engine.ready()
    serving = "preview" if engine.describe().preview else "step-audio"
    if ready and settings.engine not in ("auto", serving):
        # e.g. a fallback to the CPU preview where Step-Audio-EditX was asked for: not ready.
        ready, reason = False, f"the {serving} engine is serving, but engine={settings.engine} is configured"
    if ready:
        device_ok, why = _device_check(engine.describe().device)
        if not device_ok:
            ready, reason = False, why
    if ready:   # the voices' database (userdata.db): unreachable -> not ready, and says why
        ready, reason = db.ping()
    return ready, reason


@ops_router.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request) -> Response:
    try:
        text = await _off_loop(request, get_metrics(request).render)
    except TimeoutError:
        raise APIError(503, f"the metrics scrape took longer than {OPS_TIMEOUT_S:g} s", "server_error",
                       "scrape_timeout") from None
    return Response(text, media_type=CONTENT_TYPE)


async def _off_loop(request: Request, fn, *args):
    """``fn(*args)`` in the app's operations executor (two threads of its own), within OPS_TIMEOUT_S.

    Raises:
        TimeoutError: it did not finish in time (it goes on in the background; the executor is small,
            so piled-up probes wait there instead of taking the engine's threads).
    """
    executor = request.app.state.ops_executor
    future = asyncio.get_running_loop().run_in_executor(executor, fn, *args)
    return await asyncio.wait_for(asyncio.shield(future), OPS_TIMEOUT_S)


def _device_check(device: str) -> tuple[bool, str]:
    """On CUDA, prove that a small allocation works (EngineInfo.device reads e.g. "cuda:0 (bfloat16)")."""
    name = device.split()[0] if device else "cpu"
    try:
        return check_allocation(name)
    except (RuntimeError, ValueError) as exc:  # an unparsable device string
        return False, f"cannot check device {name!r}: {exc}"



@router.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
def unknown_endpoint(path: str, request: Request) -> None:
    """Unknown /v1 paths answer a JSON 404 (without this the mounted UI would answer them); a known
    path with the wrong method answers 405 (this catch-all would otherwise turn it into a 404)."""
    allowed = set()
    for route in (*api_voices.router.routes, *api_productions.router.routes, *router.routes):
        if isinstance(route, APIRoute) and route.endpoint is not unknown_endpoint \
                and route.matches(request.scope)[0] == Match.PARTIAL:
            allowed |= route.methods
    if allowed:
        raise APIError(405, f"{request.method} is not allowed on /v1/{path}; use {', '.join(sorted(allowed))}",
                       "invalid_request_error", "method_not_allowed", headers={"Allow": ", ".join(sorted(allowed))})
    raise APIError(404, f"no API endpoint /v1/{path}; see /docs", "invalid_request_error", "not_found")
