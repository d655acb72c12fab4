"""What one can do with a production: create it, generate takes, choose, edit, render.

Owns: turning text, a speaker script or an SRT file into a stored production (with the size limits and
the cast check), submitting all pending segments together to the engine (a thread pool as wide as the
LLM's continuous batch, so they decode together) with per-segment progress (``productions.jobs``),
making every generation a new take (seed, timings, scores from an optional scorer), fitting a take to
its SRT cue with the engine's speed edit, editing a take into a new take, and rendering the chosen takes
(``productions.output``: audio, SRT, WebVTT, JSON manifest, reused while nothing changed).
Does not own: the tables (``userdata.productions``), the engine, stored voices (any object with
``get(id)`` -> voice with ``.transcript``, ``audio(id)`` -> ``Audio``, raising ``InputError`` for a
missing voice), HTTP (``web.api_productions``).

The quality hook: ``scorer(audio, text) -> TakeCheck`` is called on every new take and its scores and
heard words (with their times: word-level captions) are stored on the take; ``None`` (the default)
stores neither, and the take's captions are one cue per segment.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Mapping, TypeVar

from core.audio_io import Audio, encode_lossless, load_audio
from core.errors import InputError, StudioError
from core.instructions import parse_instructions
from productions.jobs import Job, JobBoard
from productions.model import Production, ProductionNotFound, Segment, Take, TakeCheck
from productions.output import Rendered, recipe_key, render_production
from productions.render import RENDER_FORMATS
from productions.repo_ids import new_id
from productions.script import check_cast, parse_script, speakers_of
from productions.splitting import split_segments
from productions.srt import parse_srt, speed_needed
from tts_engine.contract import validate_edit, validate_iterations, validate_text

log = logging.getLogger(__name__)
T = TypeVar("T")
Call = Callable[[str, Callable[[], T]], T]
Scorer = Callable[[Audio, str], TakeCheck]
MAX_TITLE_CHARS = 200
MAX_PAUSE_MS = 60_000


class ProductionConflict(InputError):
    """The production is not in a state for this request (render while segments are pending, a segment
    already being generated); answered 409."""


def _direct(endpoint: str, fn: Callable[[], T]) -> T:
    return fn()


class ProductionService:
    """Parameters:
        engine: the loaded engine (``tts_engine.contract.Engine``).
        store: a ``userdata.productions.ProductionStore``.
        voices: the stored voices (see the module docstring).
        settings: the studio's ``Settings`` (limits, pauses, loudness, workers).
        renders_dir: where renders are written (derived data: safe to delete, re-rendered on demand).
        call: ``call(endpoint, fn)`` runs an engine call (the web layer times, counts and logs it).
        scorer: the quality hook, or None.
    """

    def __init__(self, engine, store, voices, settings, renders_dir: Path, call: Call = _direct,
                 scorer: Scorer | None = None) -> None:
        self.engine, self.store, self.voices, self.settings = engine, store, voices, settings
        self.renders_dir = Path(renders_dir)
        self.call = call
        self.scorer = scorer
        self.jobs = JobBoard()
        workers = settings.production_workers or settings.llm_max_rows
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="production")
        self._lock = threading.Lock()
        self._in_flight: set[str] = set()          # segment ids being generated in this process
        self._render_locks: dict[str, threading.Lock] = {}

    @property
    def segment_chars(self) -> int:
        """The most characters one segment holds: what the model speaks in one go."""
        return min(self.settings.text_chunk_chars, self.settings.max_text_chars)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ creating

    def create(self, title: str, source_kind: str, content: str, voice: str | None = None,
               cast: Mapping[str, str] | None = None, fit_to_cue: bool = False) -> Production:
        """A new production from ``content``: ``text`` (one ``voice``), ``script`` (``Name: line`` /
        ``[S1] line`` with a ``cast``) or ``srt`` (one ``voice``; cue timings kept as targets).

        Raises:
            InputError: empty or oversized content, too many segments, a speaker missing from the cast,
                a voice that does not exist, a broken SRT, an unknown source kind.
        """
        limit = self.settings.production_max_chars
        if content is not None and len(content) > limit:
            raise InputError(f"the {source_kind} is {len(content):,} characters long; the limit is {limit:,} "
                             "(setting production_max_chars)")
        title = (title or "").strip()[:MAX_TITLE_CHARS] or "Untitled production"
        pause, long_pause = self.settings.production_pause_ms, self.settings.production_paragraph_pause_ms
        rows: list[dict] = []
        if source_kind == "text":
            voice_id = self._voice(voice, "voice")
            for piece in split_segments(content, self.segment_chars):
                rows.append({"text": piece.text, "voice_id": voice_id,
                             "pause_ms": long_pause if piece.paragraph_end else pause})
        elif source_kind == "script":
            lines = parse_script(content, self.segment_chars)
            chosen = check_cast(speakers_of(lines), cast or {})
            for speaker, voice_id in chosen.items():
                self._voice(voice_id, f"the voice cast for {speaker!r}")
            for line in lines:
                rows.append({"text": line.text, "voice_id": chosen[line.speaker], "speaker": line.speaker,
                             "pause_ms": long_pause if line.turn_end else pause})
        elif source_kind == "srt":
            voice_id = self._voice(voice, "voice")
            for cue in parse_srt(content):
                if len(cue.text) > self.segment_chars:
                    raise InputError(f"SRT cue {cue.index} is {len(cue.text)} characters long; one cue is one "
                                     f"model call, at most {self.segment_chars} characters")
                rows.append({"text": cue.text, "voice_id": voice_id, "pause_ms": 0,
                             "target_start_ms": cue.start_ms, "target_end_ms": cue.end_ms})
        else:
            raise InputError(f"unknown production source {source_kind!r}; use text, script or srt")
        if len(rows) > self.settings.production_max_segments:
            raise InputError(f"the {source_kind} makes {len(rows)} segments; the limit is "
                             f"{self.settings.production_max_segments} (setting production_max_segments)")
        now = time.time()
        pid = new_id("prod")
        segments = tuple(Segment(id=new_id("seg"), production_id=pid, position=i, **row) for i, row in enumerate(rows))
        production = Production(pid, title, source_kind, now, now, fit_to_cue=bool(fit_to_cue and source_kind == "srt"),
                                segments=segments)
        log.info("production %s created from %s: %d segments", pid, source_kind, len(segments))
        return self.store.create(production)

    def _voice(self, voice_id: str | None, what: str) -> str:
        if not voice_id or not str(voice_id).strip():
            raise InputError(f"{what} is missing: give a stored voice id (POST /v1/audio/voices)")
        self.voices.get(str(voice_id).strip())   # raises for a voice that does not exist
        return str(voice_id).strip()

    def voice_problems(self, production: Production) -> dict[str, str]:
        """segment id -> why it cannot be generated (its voice was deleted), for every such segment."""
        missing: dict[str, bool] = {}
        for voice_id in {s.voice_id for s in production.segments}:
            try:
                self.voices.get(voice_id)
                missing[voice_id] = False
            except InputError:
                missing[voice_id] = True
        return {s.id: f"voice {s.voice_id!r} was deleted; choose another voice for this segment"
                for s in production.segments if missing[s.voice_id]}

    # ------------------------------------------------------------------ changing segments

    def update_segment(self, production_id: str, segment_id: str, changes: Mapping[str, object]) -> Segment:
        """Change a segment (text, voice, instructions, pause_ms, speaker); text, voice or instruction
        changes make it pending again.

        Raises:
            InputError: a bad value (empty/over-long text, unknown voice, instructions the engine cannot do,
                pause out of range). ProductionNotFound.
        """
        clean: dict[str, object] = {}
        for key, value in changes.items():
            if value is None:
                continue
            if key == "text":
                clean[key] = validate_text(str(value), "text", self.segment_chars)
            elif key in ("voice", "voice_id"):
                clean["voice_id"] = self._voice(str(value), "voice")
            elif key == "instructions":
                self._check_instructions(str(value))
                clean[key] = str(value).strip()
            elif key == "pause_ms":
                if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_PAUSE_MS:
                    raise InputError(f"pause_ms must be a whole number from 0 to {MAX_PAUSE_MS}, not {value!r}")
                clean[key] = value
            elif key == "speaker":
                clean[key] = str(value).strip()[:100]
            else:
                raise InputError(f"cannot change {key!r} of a segment; use text, voice, instructions, pause_ms or speaker")
        if segment_id in self._in_flight and any(k in ("text", "voice_id", "instructions") for k in clean):
            raise ProductionConflict("this segment is being generated; change it when its take is ready")
        return self.store.update_segment(production_id, segment_id, clean)

    def _check_instructions(self, instructions: str):
        steps = parse_instructions(instructions)
        caps = self.engine.capabilities()
        for step in steps:
            validate_edit(step.edit_type, step.edit_info, caps)
        return steps

    def choose(self, production_id: str, segment_id: str, take_id: str) -> Segment:
        return self.store.choose(production_id, segment_id, take_id)

    # ------------------------------------------------------------------ generating

    def generate(self, production_id: str, segment_ids: list[str] | None = None) -> Job:
        """Start generating: every pending segment (``segment_ids`` None), or exactly the segments named
        (a new take each: "regenerate"). All are submitted at once; returns the job at once.

        Raises:
            ProductionNotFound: the production or a named segment does not exist.
            ProductionConflict: a named segment is being generated already.
        """
        production = self.store.get(production_id)
        if segment_ids is None:
            targets = [s for s in production.segments if s.pending and s.id not in self._in_flight]
            reason = "generate"
        else:
            targets = []
            for sid in dict.fromkeys(segment_ids):
                seg = production.segment(sid)
                if seg is None:
                    raise ProductionNotFound(f"production {production_id!r} has no segment {sid!r}")
                targets.append(seg)
            reason = "regenerate"
        problems = self.voice_problems(production)
        with self._lock:
            busy = [s.id for s in targets if s.id in self._in_flight]
            if busy and segment_ids is not None:
                raise ProductionConflict(f"segment(s) {', '.join(busy)} are being generated already; wait for their take")
            self._in_flight.update(s.id for s in targets)
        job = self.jobs.add(Job(production_id, [s.id for s in targets], reason))
        try:
            self.store.set_state([s.id for s in targets if s.id not in problems], "generating")
            for seg in targets:
                if seg.id in problems:
                    self._fail(job, seg, problems[seg.id])
                else:
                    self._pool.submit(self._generate_one, job, production, seg, reason)
        except BaseException:
            with self._lock:
                self._in_flight.difference_update(s.id for s in targets)
            raise
        log.info("production %s: job %s generates %d segment(s)", production_id, job.id, len(targets))
        return job

    def _fail(self, job: Job, seg: Segment, message: str) -> None:
        try:
            self.store.set_state([seg.id], "failed", message)
        finally:
            with self._lock:
                self._in_flight.discard(seg.id)
            job.update(seg.id, "failed", error=message)

    def _generate_one(self, job: Job, production: Production, seg: Segment, reason: str) -> None:
        job.update(seg.id, "generating")
        try:
            take, audio, note = self._make_take(production, seg, reason, job.id)
            self.store.add_take(production.id, take, audio, choose=True, note=note)
        except StudioError as exc:
            log.warning("production %s segment %s failed: %s", production.id, seg.id, exc)
            self._fail(job, seg, str(exc))
            return
        except Exception:   # the pool would swallow it: log it here, and say so on the segment
            log.exception("production %s segment %s failed (job %s)", production.id, seg.id, job.id)
            self._fail(job, seg, f"internal error; the server log has the details (job {job.id})")
            return
        with self._lock:
            self._in_flight.discard(seg.id)
        job.update(seg.id, "ready", take_id=take.id)

    def _make_take(self, production: Production, seg: Segment, reason: str, job_id: str) -> tuple[Take, bytes, str]:
        voice = self.voices.get(seg.voice_id)
        prompt = self.voices.audio(seg.voice_id)
        steps = self._check_instructions(seg.instructions)
        started = time.perf_counter()
        result = self.call("production_clone", lambda: self.engine.clone(prompt, voice.transcript, seg.text))
        timings = {f"clone_{k}": round(v, 2) for k, v in result.timings.stages_ms.items()}
        timings["clone_ms"] = round(result.timings.total_ms, 2)
        audio, source, note = result.audio, reason, ""
        for i, step in enumerate(steps):
            edit_started = time.perf_counter()
            edited = self.call(f"production_edit_{step.edit_type}", lambda step=step, i=i, src=audio: self.engine.edit(
                src, result.text, step.edit_type, step.edit_info, seed=(result.seed + 1 + i) % 2**31))
            audio = edited.audio
            timings[f"edit{i + 1}_{step.edit_type}_ms"] = round((time.perf_counter() - edit_started) * 1000, 2)
        if production.fit_to_cue and seg.target_end_ms is not None and seg.target_start_ms is not None:
            audio, source, note = self._fit(seg, audio, result, source, timings)
        timings["total_ms"] = round((time.perf_counter() - started) * 1000, 2)
        return self._take(seg, audio, result.seed, source, timings, None) + (note,)

    def _fit(self, seg: Segment, audio: Audio, result, source: str, timings: dict) -> tuple[Audio, str, str]:
        """The take sped up (the mildest speed edit that suffices) to fit its cue, or a note saying it cannot."""
        cue_ms = seg.target_end_ms - seg.target_start_ms
        option = speed_needed(audio.duration * 1000, cue_ms)
        if option is None:
            return audio, source, ""
        caps = {c.edit_type: c for c in self.engine.capabilities()}
        speed = caps.get("speed")
        if speed is None or not speed.available:
            return audio, source, f"the take is {audio.duration:.2f} s, its cue {cue_ms / 1000:.2f} s; this engine cannot change speed"
        tried = []
        from productions.srt import SPEED_STEPS
        options = [o for o, _ in SPEED_STEPS]
        for opt in options[options.index(option):]:
            started = time.perf_counter()
            fitted = self.call("production_fit", lambda opt=opt: self.engine.edit(
                audio, result.text, "speed", opt, seed=(result.seed + 97) % 2**31))
            timings[f"fit_{opt.replace(' ', '_')}_ms"] = round((time.perf_counter() - started) * 1000, 2)
            tried.append(f"{opt}: {fitted.audio.duration:.2f} s")
            if fitted.audio.duration * 1000 <= cue_ms:
                return fitted.audio, f"{source}+fit:{opt}", ""
        return fitted.audio, f"{source}+fit:{options[-1]}", (
            f"does not fit its cue: {cue_ms / 1000:.2f} s, the take is {audio.duration:.2f} s "
            f"({'; '.join(tried)}); shorten the text or lengthen the cue")

    def _take(self, seg: Segment, audio: Audio, seed: int, source: str, timings: dict,
              parent: str | None) -> tuple[Take, bytes]:
        check = TakeCheck()
        if self.scorer is not None:
            try:
                check = self.scorer(audio, seg.text)
            except Exception:   # a scorer's failure must not lose the take
                log.exception("quality scorer failed on segment %s", seg.id)
        wav = encode_lossless(audio)
        take = Take(id=new_id("take"), segment_id=seg.id, created_at=time.time(), seed=int(seed), source=source,
                    text=seg.text, voice_id=seg.voice_id, duration_ms=int(round(audio.duration * 1000)),
                    sample_rate=audio.sample_rate, audio_sha256=hashlib.sha256(wav).hexdigest(),
                    parent_take_id=parent, timings=timings,
                    scores={k: float(v) for k, v in check.scores.items()}, words=tuple(check.words))
        return take, wav

    def edit_take(self, production_id: str, segment_id: str, take_id: str, edit_type: str,
                  edit_info: str | None = None, text: str | None = None, iterations: int = 1,
                  seed: int | None = None) -> Take:
        """Edit one take; the result is a new take of the same segment (chosen), the others untouched.

        Raises:
            InputError: an edit the engine cannot do, bad iterations. ProductionNotFound.
        """
        seg = self.store.segment(production_id, segment_id)
        take = next((t for t in seg.takes if t.id == take_id), None)
        if take is None:
            raise ProductionNotFound(f"segment {segment_id!r} has no take {take_id!r}")
        iterations = validate_iterations(iterations)
        edit_info = validate_edit(edit_type, edit_info or None, self.engine.capabilities())
        if text is not None and text.strip():
            text = validate_text(text, "text", self.segment_chars)
        source_audio = load_audio(self.store.take_audio(take))
        started = time.perf_counter()
        results = self.call(f"production_edit_{edit_type}", lambda: self.engine.edit_iterations(
            source_audio, take.text, edit_type, edit_info, text or None, iterations=iterations, seed=seed))
        timings = {"edit_ms": round((time.perf_counter() - started) * 1000, 2),
                   "total_ms": round((time.perf_counter() - started) * 1000, 2)}
        label = f"edit:{edit_type}:{edit_info}" if edit_info else f"edit:{edit_type}"
        if iterations > 1:
            label += f"x{iterations}"
        # The take records the text it says: the segment's, as before the edit.
        new_take, wav = self._take(seg, results[-1].audio, results[0].seed, label, timings, take.id)
        new_take = Take(**{**new_take.__dict__, "text": take.text, "voice_id": take.voice_id})
        self.store.add_take(production_id, new_take, wav, choose=True)
        return new_take

    def take_audio(self, production_id: str, segment_id: str, take_id: str) -> bytes:
        seg = self.store.segment(production_id, segment_id)
        take = next((t for t in seg.takes if t.id == take_id), None)
        if take is None:
            raise ProductionNotFound(f"segment {segment_id!r} has no take {take_id!r}")
        return self.store.take_audio(take)

    def delete(self, production_id: str) -> None:
        self.store.delete(production_id)

    # ------------------------------------------------------------------ rendering

    def render(self, production_id: str, fmt: str = "wav") -> Rendered:
        """Render the chosen takes (reused when this exact render exists already); see ``productions.output``.

        Raises:
            ProductionConflict: segments without a chosen take (they are named), or none at all.
            InputError: an unknown format. ProductionNotFound.
        """
        if fmt not in RENDER_FORMATS:
            raise InputError(f"unsupported render format {fmt!r}; choose one of {', '.join(RENDER_FORMATS)}")
        production = self.store.get(production_id)
        pending = [s for s in production.segments if s.chosen is None]
        if pending:
            names = ", ".join(f"#{s.position + 1}" for s in pending[:10]) + (" ..." if len(pending) > 10 else "")
            raise ProductionConflict(f"{len(pending)} of {len(production.segments)} segments have no chosen take yet "
                                     f"({names}); generate them (POST /v1/productions/{production_id}/generate) "
                                     "before rendering")
        key = recipe_key(production, fmt, self.settings)
        with self._lock:
            lock = self._render_locks.setdefault(f"{production_id}/{key}", threading.Lock())
        with lock:
            return render_production(production, fmt, key, self.settings, self.renders_dir,
                                     lambda take: load_audio(self.store.take_audio(take)), self.engine)

