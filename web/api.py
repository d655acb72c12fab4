"""HTTP routes for speech, edits, the prompt cache, the engine, health and metrics.

Owns: ``POST /v1/audio/speech`` (OpenAI compatible), ``POST /v1/audio/edits``,
``GET /v1/models``, ``GET /v1/engine``, ``GET /v1/cache/stats``, ``POST /v1/cache/clear``,
``GET /healthz``, ``GET /readyz``, ``GET /metrics``; their pydantic models.
Does not own: voices (``web.api_voices``), shared plumbing (``web.deps``).

Engine routes are plain ``def``: FastAPI runs them in its threadpool, so a long clone never
blocks the event loop (and the Gradio UI served by the same loop).

``speed``: the engine's speed edit is coarse (faster / slower / more faster / more slower) and
regenerates the audio, so it cannot honour an exact factor; any ``speed`` other than 1.0 is
refused with a 400 pointing at ``/v1/audio/edits`` (edit_type ``speed``).
"""

from __future__ import annotations

import logging
from typing import Literal

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field
from starlette.routing import Match

from core.audio_io import OUTPUT_FORMATS, encode_audio, load_audio, media_type
from core.edit_options import EDIT_TYPES
from core.errors import InputError
from core.settings import Settings
from engine.contract import CloneOptions, Engine, validate_text
from web import api_voices
from web.deps import (APIError, get_engine, get_metrics, get_settings, get_voices, jsonable, read_upload,
                      require_api_key, result_headers, run_engine)
from web.metrics import CONTENT_TYPE, Metrics
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
    instructions: str | None = Field(None, description="not supported; use /v1/audio/edits")
    stream_format: Literal["audio", "sse"] | None = Field(
        None, description="'audio' sends pcm or wav audio as it is generated; 'sse' sends speech.audio.delta "
                          "events (base64 audio) then speech.audio.done (usage, timings); omitted: one whole file")
    seed: int | None = Field(None, description="sampling seed; omitted or negative means random (reported in X-Seed)")
    flow_steps: int | None = Field(None, description="flow-matching Euler steps (1..50); default from settings")


def _audio_response(result, engine: Engine, fmt: str) -> Response:
    return Response(encode_audio(result.audio, fmt), media_type=media_type(fmt), headers=result_headers(result, engine))


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
    if body.instructions:
        raise InputError("instructions are not supported; apply emotion or style with POST /v1/audio/edits")
    if body.stream_format:
        check_stream_format(fmt)
    text = validate_text(body.input, "input", settings.max_text_chars)
    voice = voices.get(check_voice_id(voice_id))
    prompt = voices.audio(voice.id)
    options = CloneOptions(flow_steps=body.flow_steps)
    if body.stream_format:
        stream, first = start_stream(request, "speech_stream", lambda: engine.clone_stream(
            prompt, voice.transcript, text, seed=body.seed, options=options))
        return stream_response(request, "speech_stream", engine, stream, first, fmt, sse=body.stream_format == "sse",
                               input_tokens=len(text))
    result = run_engine(request, "speech", lambda: engine.clone(prompt, voice.transcript, text, seed=body.seed,
                                                                options=options))
    return _audio_response(result, engine, fmt)


@router.post("/audio/edits", summary="Edit a clip: emotion, style, speed, paralinguistic, denoise, vad",
             response_class=Response)
def create_edit(request: Request,
                edit_type: str = Form(..., description="emotion, style, speed, paralinguistic, denoise or vad"),
                edit_info: str | None = Form(None, description="the option, e.g. happy (see GET /v1/engine)"),
                audio_text: str | None = Form(None, description="what the clip says (default: the voice's transcript)"),
                text: str | None = Form(None, description="paralinguistic only: the text with tags, e.g. [Laughter]"),
                file: UploadFile | None = File(None, description="the clip to edit (or give voice)"),
                voice: str | None = Form(None, description="edit a stored voice's clip instead of a file"),
                seed: int | None = Form(None), flow_steps: int | None = Form(None),
                response_format: str = Form("wav"),
                engine: Engine = Depends(get_engine), voices: VoiceStore = Depends(get_voices),
                settings: Settings = Depends(get_settings)) -> Response:
    fmt = _check_format(response_format)
    if (file is None) == (voice is None):
        raise InputError("give exactly one of 'file' (an audio upload) or 'voice' (a stored voice id)")
    if file is not None:
        audio = load_audio(read_upload(file, settings, "audio file"), max_seconds=settings.max_prompt_seconds)
    else:
        stored = voices.get(check_voice_id(voice))
        audio = voices.audio(stored.id)
        audio_text = audio_text or stored.transcript
    audio_text = validate_text(audio_text, "audio_text", settings.max_text_chars)
    if text is not None and text.strip():
        text = validate_text(text, "text", settings.max_text_chars)
    options = CloneOptions(flow_steps=flow_steps)
    result = run_engine(request, f"edit_{edit_type}" if edit_type in EDIT_TYPES else "edit",
                        lambda: engine.edit(audio, audio_text, edit_type, edit_info or None, text or None,
                                            seed=seed, options=options))
    return _audio_response(result, engine, fmt)


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
    return JSONResponse(jsonable(engine.cache.stats()))


@router.post("/cache/clear", summary="Empty the prompt cache (stored voices stay; entries are recomputed)")
def cache_clear(engine: Engine = Depends(get_engine)) -> JSONResponse:
    engine.cache.clear()
    log.info("prompt cache cleared through the API")
    return JSONResponse({"cleared": True, "stats": jsonable(engine.cache.stats())})


# ----------------------------------------------------------------------------- operations (no key)

@ops_router.get("/healthz", summary="The process is up")
def healthz() -> dict:
    return {"status": "ok"}


@ops_router.get("/readyz", summary="The engine is loaded (and, on CUDA, can allocate)")
def readyz(engine: Engine = Depends(get_engine)) -> JSONResponse:
    try:
        ready, reason = engine.ready()
        if ready:
            device_ok, why = _device_check(engine.describe().device)
            if not device_ok:
                ready, reason = False, why
    except Exception as exc:  # a readiness probe answers, it never raises
        log.exception("readiness check failed")
        ready, reason = False, f"readiness check failed: {type(exc).__name__}"
    return JSONResponse({"ready": bool(ready), "reason": reason}, status_code=200 if ready else 503)


@ops_router.get("/metrics", summary="Prometheus metrics")
def metrics(metrics: Metrics = Depends(get_metrics)) -> Response:
    return Response(metrics.render(), media_type=CONTENT_TYPE)


def _device_check(device: str) -> tuple[bool, str]:
    """On CUDA, prove that a small allocation works (EngineInfo.device reads e.g. "cuda:0 (bfloat16)")."""
    from core.devices import check_allocation

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
    for route in (*api_voices.router.routes, *router.routes):
        if isinstance(route, APIRoute) and route.endpoint is not unknown_endpoint \
                and route.matches(request.scope)[0] == Match.PARTIAL:
            allowed |= route.methods
    if allowed:
        raise APIError(405, f"{request.method} is not allowed on /v1/{path}; use {', '.join(sorted(allowed))}",
                       "invalid_request_error", "method_not_allowed", headers={"Allow": ", ".join(sorted(allowed))})
    raise APIError(404, f"no API endpoint /v1/{path}; see /docs", "invalid_request_error", "not_found")
