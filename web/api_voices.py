"""HTTP routes for stored voices: create, list, get, delete, export and import.

Owns: ``/v1/audio/voices`` and its pydantic models (a voice stored without a transcript gets the
engine's transcription): create and import store the voice together with the prompt-cache entries
the engine made for its clip (so another host clones from it without encoding the clip again);
export asks the engine for the voice's prompt-cache entries (``Engine.export_prompt``) and packs
them into a bundle signed with ``settings.bundle_key``; import unpacks a bundle and hands the engine
its entries only when the signature verified (``Engine.import_prompt`` stores those that match it;
the rest are recomputed).
Does not own: the bundle format and its signature (``web.voices``), storing voices and the quotas
(``userdata.voices``), which entries exist or how they are cached (the engine and its cache).
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import Response
from pydantic import BaseModel

from core.audio_io import load_audio
from core.settings import Settings
from tts_engine.contract import Engine, PromptReport, validate_text
from web.deps import get_engine, get_settings, get_voices, read_upload, require_api_key, run_engine
from web.voice_prompts import cached_prompts
from web.voices import Voice, VoiceStore, check_voice_id, export_bundle, read_bundle

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
    recomputed: list[str]        # kinds the engine had to compute (unsigned bundle, other model, or absent)
    signed: bool                 # the bundle's signature verified with this server's bundle_key
    trust: str                   # why its entries were not used ("" when signed)


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
    voices.check_quota()   # before any engine work
    audio = load_audio(read_upload(file, settings, "audio file"), max_seconds=settings.max_prompt_seconds)
    transcribed = not (transcript and transcript.strip())
    if transcribed:
        transcript = run_engine(request, "transcribe", lambda: engine.transcribe(audio)).text
    transcript = validate_text(transcript, "transcript", settings.max_text_chars)
    # Prepare first: a clip the engine cannot use never becomes a voice.
    report = run_engine(request, "voice_prepare", lambda: engine.prepare_prompt(audio))
    voice = voices.create(audio, transcript, name, report.namespaces,
                          prompts=cached_prompts(engine, report.digest, report.namespaces))
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


@router.get("/{voice_id}/export", summary="The voice as a portable bundle (zip, signed when bundle_key is set)",
            response_class=Response, responses={200: {"content": {"application/zip": {}}}})
def export_voice(voice_id: str, request: Request, engine: Engine = Depends(get_engine),
                 voices: VoiceStore = Depends(get_voices), settings: Settings = Depends(get_settings)) -> Response:
    voice = voices.get(check_voice_id(voice_id))
    audio = voices.audio(voice.id)
    # Entries that were evicted or cleared are computed again; reading them is no cache hit.
    entries = run_engine(request, "voice_export", lambda: engine.export_prompt(audio))
    data = export_bundle(voices, voice.id, list(entries), engine.describe().name, settings.bundle_key)
    return Response(data, media_type="application/zip",
                    headers={"Content-Disposition": f'attachment; filename="{voice.id}.voice.zip"',
                             "X-Bundle-Entries": ",".join(f"{e.kind}" for e in entries),
                             "X-Bundle-Signed": "true" if settings.bundle_key else "false"})


@router.post("/import", status_code=201, response_model=VoiceImported, summary="Store a voice from a bundle")
def import_voice(request: Request, file: UploadFile = File(..., description="a bundle from .../export"),
                 name: str = Form("", description="overrides the bundle's name"),
                 engine: Engine = Depends(get_engine), voices: VoiceStore = Depends(get_voices),
                 settings: Settings = Depends(get_settings)) -> dict:
    voices.check_quota()
    bundle = read_bundle(read_upload(file, settings, "voice bundle"), settings.max_prompt_seconds,
                         settings.bundle_key, max_audio_bytes=settings.max_upload_bytes)
    transcript = validate_text(bundle.transcript, "the bundle's transcript", settings.max_text_chars)
    done = run_engine(request, "voice_prepare", lambda: engine.import_prompt(bundle.audio, bundle.entries))
    try:
        voice = voices.create(bundle.audio, transcript, name or bundle.name, done.report.namespaces,
                              prompts=cached_prompts(engine, done.report.digest, done.report.namespaces))
    except BaseException:
        engine.undo_prompt_import(done)   # a failed import leaves nothing behind
        raise
    return {**_voice_model(voice), "prepared": _prepared(done.report), "imported": sorted(done.imported),
            "recomputed": sorted(done.report.misses), "signed": bundle.signed, "trust": bundle.trust}
