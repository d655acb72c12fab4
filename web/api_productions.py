"""HTTP routes for productions: ``/v1/productions`` (scripts made segment by segment, take by take).

Owns: the routes and their pydantic bodies -- create (from text, a speaker script with a cast, or an
SRT file), list, get (each segment says when its voice was deleted), rename, delete, change a segment,
generate (all pending, or named segments: a new take each) answered at once with a job, the job's
progress (a JSON resource, and the same as server-sent events), choose a take, edit a take into a new
take, a take's audio, render, and the render's audio, captions (SRT, WebVTT) and manifest; the 404/409
answers of productions; building the ``ProductionService`` for the app (``create_service``).
Does not own: what these do (``productions.service``), the tables (``userdata.productions``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Body, Depends, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import StreamingResponse

from core.audio_io import OUTPUT_FORMATS, encode_audio, load_audio, media_type
from core.errors import InputError
from productions.model import Production, ProductionNotFound
from productions.render import RENDER_FORMATS
from productions.repo_ids import check_id
from productions.service import ProductionConflict, ProductionService
from web.deps import APIError, error_response, request_id, require_api_key, run_engine_call

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/productions", tags=["productions"], dependencies=[Depends(require_api_key)])
SSE_KEEPALIVE_S = 15.0
MAX_JOB_WAIT_S = 30.0


def create_service(engine, settings, db, voices, metrics, scorer=None) -> ProductionService:
    """The app's production service: engine calls timed, counted and logged like the API's own;
    ``scorer(audio, text) -> {name: value}`` (the quality hook) scores every new take."""
    from userdata.productions import ProductionStore

    def call(endpoint, fn):
        return run_engine_call(metrics, endpoint, "production", fn)

    return ProductionService(engine, ProductionStore(db), voices, settings,
                             renders_dir=Path(settings.cache_dir) / "renders", call=call, scorer=scorer)


def attach(app, engine, settings) -> None:
    """Give ``app`` its production service (``app.state.productions``), on the app's user-data database
    (``app.state.db``) or, while the app has none, one opened (and upgraded) here from the settings."""
    from userdata.db import open_database

    db = getattr(app.state, "db", None)
    if db is None:
        db = app.state.productions_db = open_database(settings)
    # The quality hook: a scorer the app holds (app.state.quality_scorer) scores every new take.
    app.state.productions = create_service(engine, settings, db, app.state.voices, app.state.metrics,
                                           scorer=getattr(app.state, "quality_scorer", None))


def detach(app) -> None:
    """At shutdown: stop taking generation work, close the database opened by :func:`attach`."""
    service = getattr(app.state, "productions", None)
    if service is not None:
        service.close()
    db = getattr(app.state, "productions_db", None)
    if db is not None:
        db.close()


def install_handlers(app) -> None:
    """404 for unknown productions, segments and takes; 409 for requests the production's state refuses."""

    @app.exception_handler(ProductionNotFound)
    async def _not_found(request: Request, exc: ProductionNotFound):
        return error_response(404, str(exc), "invalid_request_error", "production_not_found", request_id(request))

    @app.exception_handler(ProductionConflict)
    async def _conflict(request: Request, exc: ProductionConflict):
        return error_response(409, str(exc), "invalid_request_error", "production_conflict", request_id(request))


def get_productions(request: Request) -> ProductionService:
    service = getattr(request.app.state, "productions", None)
    if service is None:
        raise APIError(503, "productions need the user-data database, which is not configured",
                       "server_error", "productions_unavailable")
    return service


# ----------------------------------------------------------------------------- bodies

class ProductionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: str = Field("", description="a name for the production")
    source: Literal["text", "script", "srt"] = Field(..., description="text: split at sentence and paragraph ends; "
                                                     "script: 'Name: line' or '[S1] line' lines with a cast; srt: one segment per cue")
    content: str = Field(..., description="the text, script or SRT file's content")
    voice: str | None = Field(None, description="text and srt: the stored voice that speaks every segment")
    cast: dict[str, str] | None = Field(None, description="script: speaker -> stored voice id, for every speaker")
    fit_to_cue: bool = Field(False, description="srt: speed up a take that is longer than its cue (speed edit)")


class ProductionRename(BaseModel):
    model_config = ConfigDict(extra="forbid")
    title: str


class SegmentUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str | None = None
    voice: str | None = None
    instructions: str | None = Field(None, description="edits after the clone, e.g. 'whisper, slower'; '' for none")
    pause_ms: int | None = Field(None, description="silence after this segment in the render (0-60000)")
    speaker: str | None = None


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    segments: list[str] | None = Field(None, description="segment ids to (re)generate, a new take each; "
                                                         "omitted: every pending segment")


class ChooseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    take_id: str


class TakeEdit(BaseModel):
    model_config = ConfigDict(extra="forbid")

    edit_type: str = Field(..., description="emotion, style, speed, paralinguistic, denoise or vad")
    edit_info: str | None = None
    text: str | None = Field(None, description="paralinguistic: the text with tags")
    iterations: int = 1
    seed: int | None = None


class RenderRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Literal["wav", "flac", "mp3", "opus"] = "wav"


# ----------------------------------------------------------------------------- views

def _view(service: ProductionService, production: Production) -> dict:
    data = production.to_json()
    problems = service.voice_problems(production)
    for seg in data["segments"]:
        seg["problem"] = problems.get(seg["id"])
    data["problems"] = len(problems)
    return data


def _ids(production_id: str, segment_id: str | None = None, take_id: str | None = None) -> None:
    check_id(production_id, "production")
    if segment_id is not None:
        check_id(segment_id, "segment")
    if take_id is not None:
        check_id(take_id, "take")


def _job_view(job, request: Request) -> dict:
    data = job.snapshot()
    data["url"] = f"/v1/productions/{job.production_id}/jobs/{job.id}"
    return data


# ----------------------------------------------------------------------------- routes

@router.post("", status_code=201, summary="Create a production from text, a speaker script with a cast, or an SRT file")
def create_production(body: ProductionCreate, service: ProductionService = Depends(get_productions)) -> JSONResponse:
    production = service.create(body.title, body.source, body.content, voice=body.voice, cast=body.cast,
                                fit_to_cue=body.fit_to_cue)
    return JSONResponse(_view(service, production), status_code=201)


@router.get("", summary="List productions (newest first)")
def list_productions(service: ProductionService = Depends(get_productions)) -> dict:
    return {"object": "list", "data": [p.summary() for p in service.store.list()]}


@router.get("/{production_id}", summary="A production with its segments and takes")
def get_production(production_id: str, service: ProductionService = Depends(get_productions)) -> dict:
    _ids(production_id)
    return _view(service, service.store.get(production_id))


@router.patch("/{production_id}", summary="Rename a production")
def rename_production(production_id: str, body: ProductionRename,
                      service: ProductionService = Depends(get_productions)) -> dict:
    _ids(production_id)
    title = body.title.strip()
    if not title:
        raise InputError("title is empty")
    return service.store.rename(production_id, title[:200]).summary()


@router.delete("/{production_id}", summary="Delete a production, its segments, takes and renders")
def delete_production(production_id: str, service: ProductionService = Depends(get_productions)) -> dict:
    _ids(production_id)
    service.delete(production_id)
    return {"id": production_id, "object": "production", "deleted": True}


@router.patch("/{production_id}/segments/{segment_id}",
              summary="Change a segment (text, voice or instructions make it pending again)")
def update_segment(production_id: str, segment_id: str, body: SegmentUpdate,
                   service: ProductionService = Depends(get_productions)) -> dict:
    _ids(production_id, segment_id)
    changes = body.model_dump(exclude_unset=True)
    return service.update_segment(production_id, segment_id, changes).to_json()


@router.post("/{production_id}/generate", status_code=202,
             summary="Generate every pending segment (or the ones named) together; answers a job at once")
def generate(production_id: str, request: Request, body: GenerateRequest | None = Body(None),
             service: ProductionService = Depends(get_productions)) -> JSONResponse:
    _ids(production_id)
    segments = body.segments if body is not None else None
    for sid in segments or ():
        check_id(sid, "segment")
    job = service.generate(production_id, segments)
    return JSONResponse(_job_view(job, request), status_code=202)


@router.post("/{production_id}/segments/{segment_id}/regenerate", status_code=202,
             summary="A new take of one segment (the others are untouched)")
def regenerate(production_id: str, segment_id: str, request: Request,
               service: ProductionService = Depends(get_productions)) -> JSONResponse:
    _ids(production_id, segment_id)
    job = service.generate(production_id, [segment_id])
    return JSONResponse(_job_view(job, request), status_code=202)


def _job(service: ProductionService, production_id: str, job_id: str):
    _ids(production_id)
    check_id(job_id, "job")
    job = service.jobs.get(job_id)
    if job is None or job.production_id != production_id:
        raise ProductionNotFound(f"no job {job_id!r} for production {production_id!r} on this server "
                                 "(jobs are kept by the server that started them; the segments' states are in the production)")
    return job


@router.get("/{production_id}/jobs/{job_id}", summary="A generation job's progress, per segment")
def get_job(production_id: str, job_id: str, request: Request,
            wait: float = Query(0.0, ge=0.0, le=MAX_JOB_WAIT_S, description="wait up to this many seconds for the job to finish"),
            service: ProductionService = Depends(get_productions)) -> dict:
    job = _job(service, production_id, job_id)
    if wait > 0 and not job.done:
        import time
        deadline = time.monotonic() + wait
        version = -1
        while not job.done and time.monotonic() < deadline:
            version = job.wait_change(version, max(0.0, deadline - time.monotonic()))
    return _job_view(job, request)


@router.get("/{production_id}/jobs/{job_id}/events", summary="A generation job's progress as server-sent events",
            response_class=StreamingResponse)
def job_events(production_id: str, job_id: str, service: ProductionService = Depends(get_productions)):
    job = _job(service, production_id, job_id)

    def events():
        version, last = -1, None
        while True:
            version = job.wait_change(version, SSE_KEEPALIVE_S)
            snapshot = job.snapshot()
            if snapshot != last:
                yield f"event: progress\ndata: {json.dumps(snapshot, separators=(',', ':'))}\n\n"
                last = snapshot
            else:
                yield ": keep-alive\n\n"
            if snapshot["done"]:
                yield f"event: done\ndata: {json.dumps({'id': job.id}, separators=(',', ':'))}\n\n"
                return

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})


@router.post("/{production_id}/segments/{segment_id}/choose", summary="Pick the take a render uses")
def choose_take(production_id: str, segment_id: str, body: ChooseRequest,
                service: ProductionService = Depends(get_productions)) -> dict:
    _ids(production_id, segment_id, body.take_id)
    return service.choose(production_id, segment_id, body.take_id).to_json()


@router.post("/{production_id}/segments/{segment_id}/takes/{take_id}/edit", status_code=201,
             summary="Edit a take; the result is a new (chosen) take, the others stay")
def edit_take(production_id: str, segment_id: str, take_id: str, body: TakeEdit,
              service: ProductionService = Depends(get_productions)) -> JSONResponse:
    _ids(production_id, segment_id, take_id)
    take = service.edit_take(production_id, segment_id, take_id, body.edit_type, body.edit_info, body.text,
                             body.iterations, body.seed)
    return JSONResponse(take.to_json(), status_code=201)


@router.get("/{production_id}/segments/{segment_id}/takes/{take_id}/audio", summary="One take's audio",
            response_class=Response)
def take_audio(production_id: str, segment_id: str, take_id: str,
               format: str = Query("wav", description="wav, flac, mp3, opus or pcm"),
               service: ProductionService = Depends(get_productions)) -> Response:
    _ids(production_id, segment_id, take_id)
    if format not in OUTPUT_FORMATS:
        raise InputError(f"unsupported format {format!r}; choose one of {', '.join(OUTPUT_FORMATS)}")
    audio = load_audio(service.take_audio(production_id, segment_id, take_id))
    return Response(encode_audio(audio, format), media_type=media_type(format))


def _render_view(production_id: str, rendered) -> dict:
    base = f"/v1/productions/{production_id}"
    fmt = rendered.manifest["render"]["format"]
    return {"object": "production.render", "reused": rendered.reused, "manifest": rendered.manifest,
            "audio_url": f"{base}/audio?format={fmt}", "srt_url": f"{base}/captions?format=srt&audio_format={fmt}",
            "vtt_url": f"{base}/captions?format=vtt&audio_format={fmt}", "manifest_url": f"{base}/manifest?format={fmt}"}


@router.post("/{production_id}/render", summary="Render the chosen takes: audio, captions and manifest")
def render_production(production_id: str, body: RenderRequest | None = Body(None),
                      service: ProductionService = Depends(get_productions)) -> dict:
    _ids(production_id)
    return _render_view(production_id, service.render(production_id, (body or RenderRequest()).format))


def _render_format(fmt: str) -> str:
    if fmt not in RENDER_FORMATS:
        raise InputError(f"unsupported render format {fmt!r}; choose one of {', '.join(RENDER_FORMATS)}")
    return fmt


@router.get("/{production_id}/audio", summary="The rendered audio (rendered now when needed)",
            response_class=FileResponse)
def render_audio(production_id: str, format: str = Query("wav"),
                 service: ProductionService = Depends(get_productions)) -> FileResponse:
    _ids(production_id)
    rendered = service.render(production_id, _render_format(format))
    ext = "ogg" if format == "opus" else format
    return FileResponse(rendered.audio, media_type=media_type(format), filename=f"{production_id}.{ext}")


@router.get("/{production_id}/captions", summary="The render's captions: SRT or WebVTT, each segment's exact place and speaker")
def render_captions(production_id: str, format: Literal["srt", "vtt"] = Query("srt"),
                    audio_format: str = Query("wav", description="the render they belong to"),
                    service: ProductionService = Depends(get_productions)) -> Response:
    _ids(production_id)
    rendered = service.render(production_id, _render_format(audio_format))
    path = rendered.srt if format == "srt" else rendered.vtt
    media = "application/x-subrip" if format == "srt" else "text/vtt"
    return Response(path.read_text(encoding="utf-8"), media_type=f"{media}; charset=utf-8",
                    headers={"Content-Disposition": f'attachment; filename="{production_id}.{format}"'})


@router.get("/{production_id}/manifest", summary="The render's manifest (segments, chosen takes, seeds, model namespaces)")
def render_manifest(production_id: str, format: str = Query("wav"),
                    service: ProductionService = Depends(get_productions)) -> dict:
    _ids(production_id)
    return service.render(production_id, _render_format(format)).manifest
