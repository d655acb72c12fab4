"""A production's render on disk: the audio, its captions (SRT, WebVTT) and the JSON manifest.

Owns: the render's name (a hash of everything that decides it: format, loudness target, cross-fade, and
every segment's chosen take, pause, cue, speaker and text -- the same recipe is rendered once and reused),
writing the four files so that a reader never sees half of one (several processes share the cache folder;
the manifest is written last, its presence means the render is whole), and the manifest itself (segments,
chosen takes, seeds, sources, sample positions, timed words, loudness, engine and model namespaces), from
which the render can be reproduced.
Does not own: joining and loudness (``productions.render``), caption text (``productions.captions``), which
takes are chosen or whether a production may be rendered (``productions.service``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from core.audio_io import Audio
from productions import captions as captions_mod
from productions.model import Production, Take
from productions.render import RenderItem, RenderResult, render

log = logging.getLogger(__name__)
MANIFEST_FORMAT = 2        # 2: word-level captions and each segment's timed words (a new render)


@dataclass(frozen=True)
class Rendered:
    """A render's files (audio, SRT, WebVTT, manifest) and what the renderer measured."""

    audio: Path
    srt: Path
    vtt: Path
    manifest_path: Path
    manifest: Mapping
    reused: bool


def recipe_key(production: Production, fmt: str, settings) -> str:
    """16 hex digits naming the render of ``production`` as it is now (every segment chosen)."""
    recipe = {"format": fmt, "rate": production.segments[0].chosen.sample_rate, "manifest": MANIFEST_FORMAT,
              "lufs": settings.production_loudness_lufs, "crossfade_ms": settings.production_crossfade_ms,
              "segments": [[s.id, s.chosen_take_id, s.pause_ms, s.target_start_ms, s.speaker, s.text]
                           for s in production.segments]}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.part")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def render_production(production: Production, fmt: str, key: str, settings, renders_dir: Path,
                      load: Callable[[Take], Audio], engine) -> Rendered:
    """The render named ``key`` under ``renders_dir/<production id>/``: reused when whole, else made.
    The caller holds the lock for ``key`` and has checked that every segment has a chosen take."""
    base = Path(renders_dir) / production.id / key
    audio, srt, vtt, manifest_path = (base.with_suffix("." + fmt), base.with_suffix(".srt"), base.with_suffix(".vtt"),
                                      base.with_suffix(".json"))
    if audio.is_file() and manifest_path.is_file():
        return Rendered(audio, srt, vtt, manifest_path, json.loads(manifest_path.read_text()), True)
    items = [RenderItem(s.id, s.speaker, s.text, (lambda t=s.chosen: load(t)), pause_ms=s.pause_ms,
                        target_start_ms=s.target_start_ms, heard=s.chosen.words) for s in production.segments]
    started = time.perf_counter()
    result = render(items, audio, fmt, sample_rate=production.segments[0].chosen.sample_rate,
                    target_lufs=settings.production_loudness_lufs, crossfade_ms=settings.production_crossfade_ms)
    elapsed = time.perf_counter() - started
    manifest = _manifest(production, result, elapsed, settings, engine)
    _write_atomically(srt, captions_mod.to_srt(result.captions))
    _write_atomically(vtt, captions_mod.to_vtt(result.captions))
    _write_atomically(manifest_path, json.dumps(manifest, indent=1, sort_keys=True, allow_nan=False))  # last
    log.info("production %s rendered: %s, %.1f s of audio in %.2f s", production.id, fmt, result.duration_s, elapsed)
    return Rendered(audio, srt, vtt, manifest_path, manifest, False)


def _manifest(production: Production, result: RenderResult, elapsed_s: float, settings, engine) -> dict:
    info = engine.describe()
    by_id = {c.segment_id: c for c in result.captions}

    def rounded(value):
        return None if value is None else round(value, 3)

    return {
        "format": MANIFEST_FORMAT,
        "production": {"id": production.id, "title": production.title, "source": production.source_kind},
        "engine": {"name": info.name, "preview": info.preview, "model_namespaces": dict(engine.prompt_namespaces())},
        "render": {"format": result.fmt, "sample_rate": result.sample_rate, "samples": result.total_samples,
                   "duration_s": round(result.duration_s, 3), "crossfade_ms": settings.production_crossfade_ms,
                   "loudness_target_lufs": settings.production_loudness_lufs,
                   "loudness_measured_lufs": rounded(result.loudness_measured_lufs),
                   "loudness_lufs": rounded(result.loudness_lufs), "gain_db": round(result.gain_db, 3),
                   "peak": round(result.peak, 4), "render_s": round(elapsed_s, 3)},
        "segments": [{"id": s.id, "position": s.position, "speaker": s.speaker, "voice": s.voice_id,
                      "text": s.text, "instructions": s.instructions, "pause_ms": s.pause_ms,
                      "target_start_ms": s.target_start_ms, "target_end_ms": s.target_end_ms,
                      "take": {"id": s.chosen.id, "seed": s.chosen.seed, "source": s.chosen.source,
                               "parent_take_id": s.chosen.parent_take_id, "audio_sha256": s.chosen.audio_sha256,
                               "duration_ms": s.chosen.duration_ms, "scores": dict(s.chosen.scores)},
                      "start_sample": by_id[s.id].start_sample, "end_sample": by_id[s.id].end_sample,
                      "start_s": round(by_id[s.id].start_s, 4), "end_s": round(by_id[s.id].end_s, 4),
                      "words": [w.as_dict() for w in by_id[s.id].words]}
                     for s in production.segments],
    }
