"""The quality hook every production take goes through, wherever the production is made.

Owns: ``take_checker(engine, settings)``, which builds the ``productions.service`` hook from the engine's
own models: the server's default quality checks (``quality_checks``) that this engine can run, and the
take's timed words (word-level captions) when ``production_word_captions`` is on and the engine's
recogniser gives timings -- heard once: a content check's recognition is reused. The page, the API
(``web.server``) and ``studio-batch script`` (``cli.production``) install the same hook, so a production's
takes are scored and captioned alike however it was made.
Does not own: scoring and timing (``quality``), storing takes (``productions.service``).
"""

from __future__ import annotations

import logging
from typing import Callable

from core.audio_io import Audio
from core.errors import StudioError
from productions.model import TakeCheck
from quality.engine_models import scorer_for_engine
from quality.timestamps import word_timestamps

log = logging.getLogger(__name__)


def take_checker(engine, settings) -> Callable[[Audio, str], TakeCheck] | None:
    """``check(audio, text) -> TakeCheck`` for new takes, or None when there is nothing to check or hear."""
    scorer = scorer_for_engine(engine)
    checks = frozenset(settings.quality_check_list) & scorer.available_checks()
    recognizer = scorer.recognizer
    hear = settings.production_word_captions and recognizer is not None and getattr(recognizer, "timed", False)
    if not checks and not hear:
        return None

    def check(audio: Audio, text: str) -> TakeCheck:
        report = scorer.score(audio, text, checks)
        words: tuple = ()
        if hear:
            heard = report.content.recognition if report.content is not None else None
            try:
                words = word_timestamps(audio, recognizer, heard)
            except StudioError as exc:    # no timings for this take: its captions stay one cue
                log.warning("no word timings for a production take: %s", exc)
        return TakeCheck(report.take_scores() if checks else {}, words)

    return check
