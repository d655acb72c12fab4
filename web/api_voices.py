"""HTTP routes for stored voices: create, list, get, delete, export and import.

Owns: ``/v1/audio/voices`` and its pydantic models (a voice stored without a transcript gets the
engine's transcription); gathering a voice's prompt-cache entries
for export and putting a bundle's entries into the cache on import (only those whose namespace
matches the running engine; the rest are recomputed by ``prepare_prompt``).
Does not own: the voice folder format (``web.voices``) or the cache (``funasr_cache``).
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import Response
from pydantic import BaseModel

from core.audio_io import load_audio
from core.errors import CacheError
from core.settings import Settings
from engine.contract import Engine, PromptReport, validate_text
from web.deps import get_engine, get_settings, get_voices, read_upload, require_api_key, run_engine
from web.voices import BundleEntry, Voice, VoiceStore, check_voice_id

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/audio/voices", tags=["voices"], dependencies=[Depends(require_api_key)])


class VoiceModel(BaseModel):
    id: str
    object: str = "voice"
    name: str
    transcript: str
    digest: str
    sample_rate: int
    duration_s: float
    created_at: float
    namespaces: dict[str, str]


class PreparedModel(BaseModel):
    """What preparing the prompt did: which kinds came from the cache, and the stage timings."""

    hits: list[str]
    misses: list[str]
    timings: dict


class VoiceCreated(VoiceModel):
    prepared: PreparedModel
    transcribed: bool = False    # True: the transcript came from the engine's ASR, not the caller


class VoiceImported(VoiceCreated):
    imported: list[str]          # kinds put into the cache from the bundle
    recomputed: list[str]        # kinds the engine had to compute (namespace differs or entry absent)


def _voice_model(voice: Voice) -> dict:
    return {**voice.to_json(), "object": "voice"}


def _prepared(report: PromptReport) -> dict:
    return {"hits": sorted(report.hits), "misses": sorted(report.misses), "timings": report.timings.as_dict()}


@router.post("", status_code=201, response_model=VoiceCreated, summary="Store a voice: clip + transcript")
def create_voice(request: Request, file: UploadFile = File(..., description="the prompt clip (WAV, FLAC, OGG, MP3)"),
                 transcript: str | None = Form(None, description="what the clip says (left out: the engine "
                                                                  "transcribes the clip)"),
                 name: str = Form("", description="a display name; also seeds the id"),
                 engine: Engine = Depends(get_engine), voices: VoiceStore = Depends(get_voices),
                 settings: Settings = Depends(get_settings)) -> dict:
    audio = load_audio(read_upload(file, settings, "audio file"), max_seconds=settings.max_prompt_seconds)
    transcribed = not (transcript and transcript.strip())
    if transcribed:
        transcript = run_engine(request, "transcribe", lambda: engine.transcribe(audio)).text
    transcript = validate_text(transcript, "transcript", settings.max_text_chars)
    # Prepare first: a clip the engine cannot use never becomes a voice.
    report = run_engine(request, "voice_prepare", lambda: engine.prepare_prompt(audio))
    voice = voices.create(audio, transcript, name, report.namespaces)
    return {**_voice_model(voice), "prepared": _prepared(report), "transcribed": transcribed}


@router.get("", summary="All stored voices")
def list_voices(voices: VoiceStore = Depends(get_voices)) -> dict:
    return {"object": "list", "data": [_voice_model(v) for v in voices.list()]}


@router.get("/{voice_id}", response_model=VoiceModel, summary="One stored voice")
def get_voice(voice_id: str, voices: VoiceStore = Depends(get_voices)) -> dict:
    return _voice_model(voices.get(check_voice_id(voice_id)))


@router.delete("/{voice_id}", summary="Delete a stored voice (its cache entries stay until evicted)")
def delete_voice(voice_id: str, voices: VoiceStore = Depends(get_voices)) -> dict:
    voices.delete(check_voice_id(voice_id))
    return {"id": voice_id, "object": "voice", "deleted": True}


@router.get("/{voice_id}/export", summary="The voice as a portable bundle (zip)",
            response_class=Response, responses={200: {"content": {"application/zip": {}}}})
def export_voice(voice_id: str, request: Request, engine: Engine = Depends(get_engine),
                 voices: VoiceStore = Depends(get_voices)) -> Response:
    voice = voices.get(check_voice_id(voice_id))
    audio = voices.audio(voice.id)
    # Re-preparing is a cache hit normally; it refills entries that were evicted or cleared.
    report = run_engine(request, "voice_prepare", lambda: engine.prepare_prompt(audio))
    entries = []
    for kind, namespace in sorted(report.namespaces.items()):
        entry = engine.cache.get(kind, namespace, report.digest)
        if entry is None:
            log.warning("voice %s: cache entry %s/%s vanished before export", voice.id, kind, namespace)
            continue
        entries.append(BundleEntry(kind, namespace, report.digest, dict(entry.payload), dict(entry.arrays),
                                   float(entry.cost_s)))
    data = voices.export_bundle(voice.id, entries, engine.describe().name)
    return Response(data, media_type="application/zip",
                    headers={"Content-Disposition": f'attachment; filename="{voice.id}.voice.zip"',
                             "X-Bundle-Entries": ",".join(f"{e.kind}" for e in entries)})


@router.post("/import", status_code=201, response_model=VoiceImported, summary="Store a voice from a bundle")
def import_voice(request: Request, file: UploadFile = File(..., description="a bundle from .../export"),
                 name: str = Form("", description="overrides the bundle's name"),
                 engine: Engine = Depends(get_engine), voices: VoiceStore = Depends(get_voices),
                 settings: Settings = Depends(get_settings)) -> dict:
    bundle = VoiceStore.read_bundle(read_upload(file, settings, "voice bundle"), settings.max_prompt_seconds)
    transcript = validate_text(bundle.transcript, "the bundle's transcript", settings.max_text_chars)
    wanted = dict(engine.prompt_namespaces()) or voices.known_namespaces()
    imported = []
    for entry in bundle.entries:
        if wanted.get(entry.kind) == entry.namespace:
            try:
                engine.cache.put(entry.kind, entry.namespace, entry.digest, dict(entry.payload), entry.cost_s,
                                 dict(entry.arrays))
            except CacheError as exc:  # e.g. a negative cost or an array the cache cannot store
                log.info("bundle entry %s/%s rejected by the cache (%s); it will be recomputed",
                         entry.kind, entry.namespace, exc)
                continue
            imported.append(entry.kind)
        else:
            log.info("bundle entry %s/%s does not match this engine (%s); it will be recomputed",
                     entry.kind, entry.namespace, wanted.get(entry.kind, "unknown"))
    report = run_engine(request, "voice_prepare", lambda: engine.prepare_prompt(bundle.audio))
    voice = voices.create(bundle.audio, transcript, name or bundle.name, report.namespaces)
    return {**_voice_model(voice), "prepared": _prepared(report), "imported": sorted(imported),
            "recomputed": sorted(report.misses)}
