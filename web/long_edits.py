"""``/v1/audio/edits`` for clips longer than one model call: the HTTP side of ``productions.long_edit``.

Owns: answering a long edit -- the edited audio, with headers saying how it was split (``X-Edit-Pieces``:
how many; ``X-Edit-Split``: each piece's start-end in seconds; ``X-Edit-Text-Source``: ``transcript`` or
``asr``; ``X-Edit-Texts``: each piece's text, percent-encoded and ``|``-separated, when it fits a header).
Does not own: splitting, dividing the text or editing (``productions.long_edit``), the route (``web.api``).
"""

from __future__ import annotations

from urllib.parse import quote

from fastapi import Request
from fastapi.responses import Response

from core.audio_io import Audio, encode_audio, media_type
from core.errors import InputError
from productions.long_edit import long_edit
from tts_engine.contract import new_seed, validate_edit
from web.deps import result_headers, run_engine

MAX_TEXT_HEADER = 6000   # bytes: proxies commonly allow 8 KB per header


def long_edit_response(request: Request, engine, settings, audio: Audio, audio_text: str | None, edit_type: str,
                       edit_info: str | None, text: str | None, iterations: int, seed: int | None, options,
                       fmt: str) -> Response:
    """Edit ``audio`` (longer than ``settings.max_prompt_seconds``) in pieces and answer it.

    Raises:
        InputError: a paralinguistic edit, an over-long transcript, what the engine raises.
    """
    validate_edit(edit_type, edit_info or None, engine.capabilities())
    if text and text.strip():
        raise InputError("'text' (a paralinguistic edit's new text) cannot be split over a long clip; edit at most "
                         f"{settings.max_prompt_seconds:g} s at a time")
    if audio_text and len(audio_text) > settings.production_max_chars:
        raise InputError(f"audio_text is {len(audio_text)} characters long; the limit is {settings.production_max_chars}")
    result = long_edit(engine, audio, audio_text, edit_type, edit_info or None,
                       max_piece_s=settings.max_prompt_seconds, iterations=iterations, seed=new_seed(seed),
                       options=options, call=lambda endpoint, fn: run_engine(request, endpoint, fn))
    rate = result.sample_rate
    headers = {**result_headers(result.results[-1], engine), "X-Seed": str(result.seed),
               "X-Edit-Pieces": str(len(result.pieces)), "X-Edit-Text-Source": result.text_source,
               "X-Edit-Split": ",".join(f"{p.start / rate:.3f}-{p.end / rate:.3f}" for p in result.pieces),
               "X-Iterations": str(iterations)}
    texts = "|".join(quote(p.text, safe=" ,.;:!?'-") for p in result.pieces)
    if len(texts) <= MAX_TEXT_HEADER:
        headers["X-Edit-Texts"] = texts
    return Response(encode_audio(result.audio, fmt), media_type=media_type(fmt), headers=headers)
