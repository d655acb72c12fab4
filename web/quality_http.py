"""Quality checks at the HTTP edge: the request's options, gated generation, headers and metrics.

Owns: the ``quality`` request object (``QualityOptions``, shared by speech and edits), turning it
into ``quality.gates.Gates``, the app's scorer (``get_scorer``: built once from the engine's own
models, or set on ``app.state.quality`` -- tests and benches plug real small models in there),
``run_gated`` (every take through ``web.deps.run_engine``, so each is counted, timed and logged),
the ``X-Quality`` header, the ``/metrics`` samples, and the captioned (JSON) speech body. Productions' own
hook is ``productions.take_checks``.
Does not own: scoring (``quality/``), the routes (``web.api``).
"""

from __future__ import annotations

import base64
import json
import logging
from typing import Callable, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.audio_io import Audio, encode_audio
from core.errors import InputError
from quality.engine_models import scorer_for_engine
from quality.gates import MAX_CANDIDATES, MAX_RETRIES, Gates, GatedTake, generate_gated
from quality.report import CHECKS, QualityScorer
from quality.timestamps import word_timestamps
from web.deps import get_metrics, run_engine

log = logging.getLogger(__name__)
T = TypeVar("T")


class QualityOptions(BaseModel):
    """Which checks run on the take, the gates, and best-of-N. Omitted: the signal checks only."""

    model_config = ConfigDict(extra="forbid")

    checks: list[str] | None = Field(None, description=f"any of {', '.join(CHECKS)} (default: signal); a "
                                                        "threshold below turns its check on")
    max_error: float | None = Field(None, description="content error (CER for Chinese, WER otherwise) above "
                                                      "this fails a take (0..1)")
    min_similarity: float | None = Field(None, description="speaker similarity to the prompt below this fails a "
                                                           "take (-1..1)")
    candidates: int = Field(1, description=f"takes generated together (1..{MAX_CANDIDATES}); the best is returned")
    retries: int = Field(0, description=f"rounds regenerated when no take passes (0..{MAX_RETRIES})")


def gates_from(options: QualityOptions | None, default_checks: frozenset[str] = frozenset({"signal"})) -> Gates:
    """The request's gates (InputError for bad values); checks it does not name are ``default_checks``."""
    if options is None:
        return Gates(default_checks)
    checks = frozenset(options.checks) if options.checks is not None else default_checks
    return Gates(checks, options.max_error, options.min_similarity, options.candidates, options.retries)


def request_gates(request: Request, options: QualityOptions | None) -> tuple[Gates, QualityScorer]:
    """The gates of a request and the app's scorer. Unnamed checks default to ``--quality-checks``,
    less those this engine cannot run (a default never makes a request fail)."""
    scorer = get_scorer(request)
    defaults = frozenset(request.app.state.settings.quality_check_list) & scorer.available_checks()
    return gates_from(options, defaults), scorer


def parse_form_options(raw: str | None) -> QualityOptions | None:
    """``QualityOptions`` from a multipart form field holding JSON (the edits route)."""
    if raw is None or not raw.strip():
        return None
    try:
        return QualityOptions.model_validate(json.loads(raw))
    except (json.JSONDecodeError, ValidationError) as exc:
        problems = exc.errors() if isinstance(exc, ValidationError) else None
        detail = "; ".join(f"{'.'.join(map(str, p['loc']))}: {p['msg']}" for p in problems) if problems else str(exc)
        raise InputError(f"quality must be a JSON object like {{\"candidates\": 3}}: {detail}") from None


def get_scorer(request: Request) -> QualityScorer:
    """The app's scorer: ``app.state.quality`` if set, else one built from the engine's models (once)."""
    state = request.app.state
    scorer = getattr(state, "quality", None)
    if scorer is None:
        scorer = state.quality = scorer_for_engine(state.engine)
    return scorer


def check_request(scorer: QualityScorer, gates: Gates, timestamps: bool = False) -> None:
    """Refuse, before anything runs, what this scorer cannot deliver."""
    scorer.check_available(gates.checks)
    if timestamps:
        if scorer.recognizer is None:
            raise InputError("timestamps need a speech recogniser, and this engine has none")
        if not getattr(scorer.recognizer, "timed", True):
            raise InputError(f"timestamps are not available: the recogniser {scorer.recognizer.name} gives no "
                             "word timings")


def run_gated(request: Request, endpoint: str, make_take: Callable[[int], T], audio_of: Callable[[T], Audio],
              text: str, gates: Gates, scorer: QualityScorer, prompt: Audio | None, seed: int | None) -> GatedTake[T]:
    """Generate and score the takes of one request (each take is one ``run_engine`` call); metrics are written."""
    reference = scorer.reference(prompt if "speaker" in gates.checks else None)
    gated = generate_gated(lambda s: run_engine(request, endpoint, lambda: make_take(s)), audio_of, text, gates,
                           scorer, reference, seed)
    observe(request, endpoint, gated)
    return gated


def observe(request: Request, endpoint: str, gated: GatedTake) -> None:
    get_metrics(request).observe_quality(endpoint, gated.report, takes=len(gated.reports))


def quality_header(gated: GatedTake) -> dict[str, str]:
    return {"X-Quality": gated.header()} if gated.report is not None else {}


def captioned_response(audio: Audio, fmt: str, gated: GatedTake, scorer: QualityScorer,
                       headers: dict[str, str]) -> JSONResponse:
    """The audio (base64, in ``fmt``) with its word timestamps and quality report, as one JSON body."""
    words = word_timestamps(audio, scorer.recognizer)
    body = {"audio": base64.b64encode(encode_audio(audio, fmt)).decode(), "response_format": fmt,
            "sample_rate": audio.sample_rate, "duration_s": round(audio.duration, 3),
            "words": [w.as_dict() for w in words], "quality": gated.as_dict()}
    return JSONResponse(body, headers=headers)
