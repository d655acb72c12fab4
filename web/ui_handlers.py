"""What the studio page's buttons do: clone, edit, history and prompt-cache events.

Owns: turning UI values into engine calls and results into what the page shows (an audio file,
a stage-timings table, a one-line summary, the history chain: one item per edit pass), filling the
transcript box from the engine's ASR, warnings about unknown tags, the per-session history state,
the streaming forms of clone and edit (``clone_streaming`` / ``edit_streaming``: WAV chunks for a
``gr.Audio(streaming=True)`` player while the engine works, then the same outputs as ``clone`` / ``edit``),
the files of each result (a lossless float WAV that the next edit starts from, and the file in the
chosen format that the page plays and offers for download), and the UI's error policy: a ``StudioError`` becomes ``gr.Error`` with its message; anything else is logged with its
traceback and shown as a generic error naming the request id (the same id as the event's HTTP
request and its ``timing`` log line: ``web.deps.run_engine_call`` runs every engine call).
Does not own: the page layout and event wiring (``web.ui``).

Session state (``gr.State``, small and copyable)::

    {"items": [{"n": 1, "op": "clone", "text": "...", "path": "/tmp/.../a.mp3", "source": "/tmp/.../a.f32.wav",
                "seed": 7, "ms": 812.3}, ...],
     "base": 0}      # index of the item the next edit applies to (None: the last one)

``path`` is what the page plays (the chosen format); ``source`` is the result's samples exactly
(32-bit float WAV), so a chain of edits never re-decodes its own lossy output.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import logging
import math
import os
import secrets
import tempfile
import time
from pathlib import Path

import gradio as gr

from core.audio_io import encode_audio, encode_lossless, load_audio
from core.edit_options import EDIT_TYPES, tag_warning
from core.errors import StudioError
from core.settings import Settings
from tts_engine.contract import CloneOptions, Engine, Result, new_seed
from web.deps import InternalError, jsonable, request_id, run_engine_call
from web.metrics import Metrics
from quality.engine_models import scorer_for_engine
from quality.gates import MAX_CANDIDATES, Gates, GatedTake, generate_gated
from quality.report import QualityReport, QualityScorer

log = logging.getLogger(__name__)

UI_FORMATS = ("wav", "flac", "mp3", "opus")   # what a browser can play (raw pcm cannot)
_EXTENSIONS = {"wav": "wav", "flac": "flac", "mp3": "mp3", "opus": "ogg"}
OUTPUT_MAX_AGE_S = 24 * 3600
_LOSSLESS_SUFFIX = ".f32.wav"
CLEAR_CONFIRMATION = "clear"   # the value the named cache_clear API needs
# The id of the page event being handled (set by ``guarded``, read where the engine is called).
_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("studio_page_request_id", default="")


def _has_key(request: gr.Request | None, key: str) -> bool:
    """Whether the page event comes from a session logged in with the key (Gradio's login checks the
    key as password) or carries it as a Bearer token."""
    if request is None:
        return False
    if getattr(request, "username", None):
        return True
    scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), key.encode())


def new_state() -> dict:
    return {"items": [], "base": None}


def page_request_id(request: gr.Request | None) -> str:
    """The id of the HTTP request that queued this page event (the ``X-Request-Id`` its client got)."""
    return request_id(getattr(request, "request", None))


def guarded(fn):
    """Show studio errors by their message and hide everything else behind the event's request id
    (generator handlers too: their errors happen while the page iterates them)."""

    @contextlib.contextmanager
    def translated(args, kwargs, bind: bool):
        request = next((a for a in (*args, *kwargs.values()) if isinstance(a, gr.Request)), None)
        rid = page_request_id(request)
        # A plain handler runs in one context: the id is bound for run_engine_call. A generator's steps
        # may run in different contexts, so it is not bound there (its engine calls name their own id).
        token = _request_id.set(rid) if bind else None
        try:
            yield
        except gr.Error:
            raise
        except StudioError as exc:
            raise gr.Error(str(exc), title="Cannot do that") from None
        except Exception as exc:
            if not isinstance(exc, InternalError):   # run_engine_call logged those already
                log.exception("UI request %s (%s) failed", rid, fn.__name__)
            raise gr.Error(f"Something went wrong inside the studio (request id {rid}); the server log has "
                           "the details.", title="Internal error") from None
        finally:
            if token is not None:
                _request_id.reset(token)

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def generator_wrapper(*args, **kwargs):
            with translated(args, kwargs, bind=False):
                yield from fn(*args, **kwargs)

        return generator_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with translated(args, kwargs, bind=True):
            return fn(*args, **kwargs)

    return wrapper


class Handlers:
    """The event handlers of one page; shared by every session (state travels in ``gr.State``)."""

    def __init__(self, engine: Engine, settings: Settings, metrics: Metrics | None = None,
                 output_dir: Path | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self.metrics = metrics or Metrics(engine.cache.snapshot)
        self.output_dir = Path(output_dir or tempfile.mkdtemp(prefix="studio-out-"))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._scorer: QualityScorer | None = None   # the engine's models as quality scorers, built on first use

    # ------------------------------------------------------------------ engine events

    def clone(self, prompt_audio: str | None, prompt_text: str, target_text: str, seed: float | None,
              flow_steps: float | None, fmt: str, state: dict | None, candidates: float | None = 1,
              retries: float | None = 0, max_error: float | None = None, min_similarity: float | None = None,
              progress=gr.Progress(), request: gr.Request | None = None):
        """Clone; returns (audio path, timings table, summary, state, history choices, history table, base note).

        An empty transcript is filled by the engine's ASR first (a notice shows what it heard). With
        ``candidates`` N > 1, N takes are generated together and the best by the checks is kept; a
        threshold (``max_error``, ``min_similarity``) fails takes below it, and ``retries`` K makes up to
        K more rounds while none passes (``quality.gates``)."""
        gates = self._gates(candidates, retries, max_error, min_similarity)
        prompt_text, options = self._clone_inputs(prompt_audio, prompt_text, target_text, flow_steps)
        if gates is not None:
            return self._clone_best(prompt_audio, prompt_text, target_text, seed, options, fmt, state, gates)
        result = self._run("clone", lambda: self.engine.clone(
            prompt_audio, prompt_text, target_text, seed=_seed(seed), options=options,
            progress=_progress_adapter(progress)))
        return self._publish(result, "clone", fmt, state)

    def edit(self, edit_type: str, edit_info: str | None, new_text: str, seed: float | None,
             flow_steps: float | None, fmt: str, state: dict | None, iterations: float | None = 1,
             progress=gr.Progress(), request: gr.Request | None = None):
        """Edit the base result (the last one unless another was chosen) ``iterations`` times, each pass on
        the previous one; every pass lands in the history. Same outputs as :meth:`clone` (for the last pass)."""
        state = _copy_state(state)
        if not state["items"]:
            raise gr.Error("Clone something first: edits apply to the last result.", title="Nothing to edit")
        base = state["items"][_base_index(state)]
        options = self._options(flow_steps)
        passes = 1 if iterations in (None, "") else int(iterations)
        text = new_text if edit_type == "paralinguistic" and new_text and new_text.strip() else None
        if text:
            _warn_tags(text)
        endpoint = f"edit_{edit_type}" if edit_type in EDIT_TYPES else "edit"  # bounded metric labels
        source = base.get("source") or base["path"]   # the lossless copy; "path" in states from before it
        if sf_duration(source) > self.settings.max_prompt_seconds:   # longer than one model call: in pieces
            audio = load_audio(source, max_seconds=self.settings.max_edit_seconds, what="the result to edit")
            results = (self._long_edit(endpoint, audio, base["text"], edit_type, edit_info, text, passes, seed,
                                       options),)
        else:
            results = self._run(endpoint, lambda: self.engine.edit_iterations(
                source, base["text"], edit_type, edit_info or None, text, iterations=passes, seed=_seed(seed),
                options=options, progress=_progress_adapter(progress)))
        label = f"{edit_type}: {edit_info}" if edit_info else edit_type
        made_from = base["n"]
        for i, result in enumerate(results[:-1]):
            state = self._publish(result, f"{label} {i + 1}/{len(results)} (of #{made_from})", fmt, state)[3]
            made_from = state["items"][-1]["n"]
        last = f"{label} {len(results)}/{len(results)}" if len(results) > 1 else label
        return self._publish(results[-1], f"{last} (of #{made_from})", fmt, state)

    def _long_edit(self, endpoint: str, audio, audio_text: str, edit_type: str, edit_info: str | None,
                   text: str | None, passes: int, seed, options) -> Result:
        """A result longer than one model call, edited in pieces (``productions.long_edit``); the page says how."""
        from productions.long_edit import long_edit

        if text:
            raise gr.Error("a paralinguistic edit's new text cannot be split over a long result; edit at most "
                           f"{self.settings.max_prompt_seconds:g} s at a time", title="Cannot do that")
        done = long_edit(self.engine, audio, audio_text, edit_type, edit_info or None,
                         max_piece_s=self.settings.max_prompt_seconds, iterations=passes, seed=new_seed(_seed(seed)),
                         options=options, call=lambda ep, fn: self._run(ep, fn))
        spans = ", ".join(f"{p['start_s']:.1f}-{p['end_s']:.1f} s" for p in done.describe()["pieces"])
        gr.Info(f"Edited in {len(done.pieces)} pieces cut at pauses ({spans}); each piece's text came from the "
                f"{done.text_source}.")
        last = done.results[-1]
        return Result(audio=done.audio, text=audio_text, timings=last.timings, seed=done.seed, tokens=(),
                      prompt_digest=last.prompt_digest)

    def transcribe(self, prompt_audio: str | None) -> str:
        """The engine's transcription of the prompt clip (the "Transcribe" button and the API)."""
        if not prompt_audio:
            raise gr.Error("Upload or record a prompt clip first.", title="Missing prompt audio")
        transcript = self._run("transcribe", lambda: self.engine.transcribe(prompt_audio))
        return transcript.text

    def fill_transcript(self, prompt_audio: str | None, current: str | None):
        """After an upload: the box's text, transcribed when the box is empty. A clip the engine cannot
        transcribe leaves the box as it is, with a warning (the user can still type)."""
        if not prompt_audio or (current and current.strip()):
            return gr.update()
        try:
            return self.transcribe(prompt_audio)
        except StudioError as exc:
            gr.Warning(f"Could not transcribe the clip: {exc}")
            return gr.update()

    def clone_streaming(self, prompt_audio: str | None, prompt_text: str, target_text: str, seed: float | None,
                        flow_steps: float | None, fmt: str, state: dict | None, candidates: float | None = 1,
                        retries: float | None = 0, max_error: float | None = None,
                        min_similarity: float | None = None):
        """:meth:`clone` while it plays: yields WAV chunks for the streaming player (the last output),
        then the outputs of :meth:`clone` (file, timings, summary, history) once the result is whole.
        Gated takes (candidates, thresholds, retries) need every take whole before one is chosen: they run
        as :meth:`clone`."""
        if self._gates(candidates, retries, max_error, min_similarity) is not None:
            outputs = self.clone(prompt_audio, prompt_text, target_text, seed, flow_steps, fmt, state, candidates,
                                 retries, max_error, min_similarity)
            yield (*outputs, encode_audio(load_audio(outputs[3]["items"][-1]["source"]), "wav"))
            return
        prompt_text, options = self._clone_inputs(prompt_audio, prompt_text, target_text, flow_steps)
        yield from self._stream("clone", "clone", fmt, state, lambda: self.engine.clone_stream(
            prompt_audio, prompt_text, target_text, seed=_seed(seed), options=options))

    def edit_streaming(self, edit_type: str, edit_info: str | None, new_text: str, seed: float | None,
                       flow_steps: float | None, fmt: str, state: dict | None, iterations: float | None = 1):
        """:meth:`edit` while it plays (see :meth:`clone_streaming`). Several passes each need the whole
        previous pass, so they run as :meth:`edit` and the page gets the last one when it is done."""
        state_items = (state or {}).get("items") or []
        base_path = (state_items[_base_index(state)].get("source") or state_items[_base_index(state)]["path"]) \
            if state_items else None
        long = base_path is not None and sf_duration(base_path) > self.settings.max_prompt_seconds
        if long or (iterations not in (None, "") and int(iterations) > 1):
            outputs = self.edit(edit_type, edit_info, new_text, seed, flow_steps, fmt, state, iterations)
            last = load_audio(outputs[3]["items"][-1]["source"])   # the player gets the last pass, whole
            yield (*outputs, encode_audio(last, "wav"))
            return
        state = _copy_state(state)
        if not state["items"]:
            raise gr.Error("Clone something first: edits apply to the last result.", title="Nothing to edit")
        base = state["items"][_base_index(state)]
        options = self._options(flow_steps)
        text = new_text if edit_type == "paralinguistic" and new_text and new_text.strip() else None
        if text:
            _warn_tags(text)
        endpoint = f"edit_{edit_type}" if edit_type in EDIT_TYPES else "edit"
        label = f"{edit_type}: {edit_info}" if edit_info else edit_type
        source = base.get("source") or base["path"]   # the lossless copy
        yield from self._stream(endpoint, f"{label} (of #{base['n']})", fmt, state, lambda: self.engine.edit_stream(
            source, base["text"], edit_type, edit_info or None, text, seed=_seed(seed), options=options))

    def _stream(self, endpoint: str, op: str, fmt: str, state: dict | None, make):
        rid, endpoint = secrets.token_hex(6), "ui_" + endpoint
        waiting = (gr.skip(),) * 7
        with self.metrics.track(endpoint):
            stream = make()
            try:
                for audio in stream:
                    yield (*waiting, encode_audio(audio, "wav"))
            finally:
                if not stream.done:   # the page went away or the engine failed: stop the work
                    stream.close()
        result = stream.result
        self.metrics.observe_timings(endpoint, result.timings)
        log.info(result.timings.log_line(endpoint, rid))
        yield (*self._publish(result, op, fmt, state), gr.skip())

    # ------------------------------------------------------------------ history

    def select(self, index: int | None, state: dict | None):
        """The chosen history item's audio for the player."""
        state = _copy_state(state)
        if index is None or not 0 <= int(index) < len(state["items"]):
            return None
        return state["items"][int(index)]["path"]

    def use_as_base(self, index: int | None, state: dict | None):
        """Make a history item the base of the next edit; returns (state, base note)."""
        state = _copy_state(state)
        if index is None or not 0 <= int(index) < len(state["items"]):
            raise gr.Error("Choose a result from the history first.", title="Nothing chosen")
        state["base"] = int(index)
        return state, base_note(state)

    # ------------------------------------------------------------------ cache

    def cache_stats(self) -> dict:
        return jsonable(self.engine.cache.snapshot())   # a read: no lock, no write (funasr_cache.store)

    def cache_clear(self, confirm: str | None = None, request: gr.Request | None = None) -> dict:
        """Empty the prompt cache (every replica sharing the folder sees it). The named API call must
        say ``confirm="clear"`` (the page's confirm button does), and with an API key set, must come
        from a logged-in page (the key as password) or carry ``Authorization: Bearer <key>``."""
        if (confirm or "").strip().lower() != CLEAR_CONFIRMATION:
            raise gr.Error(f'Clearing the prompt cache needs confirm="{CLEAR_CONFIRMATION}" (it empties it for '
                           "every replica; stored voices stay).", title="Not confirmed")
        if self.settings.api_key and not _has_key(request, self.settings.api_key):
            raise gr.Error("Clearing the prompt cache needs the API key: log in with it, or send "
                           "'Authorization: Bearer <key>'.", title="Not allowed")
        self.engine.cache.clear()
        log.info("prompt cache cleared from the UI (request %s)", page_request_id(request))
        return self.cache_stats()

    # ------------------------------------------------------------------ helpers

    def _clone_inputs(self, prompt_audio: str | None, prompt_text: str, target_text: str,
                      flow_steps: float | None) -> tuple[str, CloneOptions]:
        """The checks both clone forms share: a clip is there, an empty transcript is filled by the
        engine's ASR (a notice shows what it heard), unknown tags are warned about; (transcript, options)."""
        if not prompt_audio:
            raise gr.Error("Upload or record a prompt clip first.", title="Missing prompt audio")
        options = self._options(flow_steps)
        if not (prompt_text and prompt_text.strip()):
            prompt_text = self.transcribe(prompt_audio)
            gr.Info(f"No transcript given; the clip was transcribed as “{_short(prompt_text, 120)}”.")
        _warn_tags(target_text)
        return prompt_text, options

    def _options(self, flow_steps: float | None) -> CloneOptions:
        steps = None if flow_steps in (None, "") else int(flow_steps)
        return CloneOptions(flow_steps=steps if steps != self.settings.flow_steps else None)

    def _run(self, endpoint: str, call) -> Result:
        return run_engine_call(self.metrics, "ui_" + endpoint, _request_id.get() or secrets.token_hex(6), call)

    def scorer(self) -> QualityScorer:
        if self._scorer is None:
            self._scorer = scorer_for_engine(self.engine)
        return self._scorer

    def _gates(self, candidates, retries, max_error, min_similarity) -> Gates | None:
        """The page's quality gates, or None when they ask for nothing beyond one take's signal checks.
        Raises InputError for values out of range or a threshold whose model this engine lacks."""
        n, k = _candidates(candidates), 0 if retries in (None, "") else int(retries)
        error = None if max_error in (None, "") else float(max_error)
        similarity = None if min_similarity in (None, "") else float(min_similarity)
        if n == 1 and k == 0 and error is None and similarity is None:
            return None
        scorer = self.scorer()
        gates = Gates(scorer.available_checks(), error, similarity, n, k)
        scorer.check_available(gates.checks)
        return gates

    def _clone_best(self, prompt_audio: str, prompt_text: str, target_text: str, seed: float | None,
                    options: CloneOptions, fmt: str, state: dict | None, gates: Gates):
        """The gated takes (every check the engine's models allow, and the page's thresholds); the best is
        published."""
        scorer = self.scorer()
        checks = gates.checks
        rid = _request_id.get() or secrets.token_hex(6)   # the takes run on other threads: name the event's id

        def take(take_seed: int) -> Result:
            return run_engine_call(self.metrics, "ui_clone", rid, lambda: self.engine.clone(
                prompt_audio, prompt_text, target_text, seed=take_seed, options=options))

        reference = scorer.reference(load_audio(prompt_audio) if "speaker" in checks else None)
        gated = generate_gated(take, lambda r: r.audio, target_text, gates, scorer, reference, _seed(seed))
        takes = len(gated.reports)
        label = f"clone (best of {takes})" if takes > 1 else "clone"
        if not gated.report.passed:
            gr.Warning(f"No take passed the gates after {takes} take(s); the best one is shown: "
                       + "; ".join(gated.report.failed))
        return self._publish(gated.take, label, fmt, state, gated)

    def _publish(self, result: Result, op: str, fmt: str, state: dict | None, gated: GatedTake | None = None):
        state = _copy_state(state)
        self._prune()
        stem = self.output_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"
        source = self._write(stem.with_name(stem.name + _LOSSLESS_SUFFIX), encode_lossless(result.audio))
        fmt = fmt if fmt in UI_FORMATS else "wav"
        path = self._write(stem.with_name(f"{stem.name}.{_EXTENSIONS[fmt]}"), encode_audio(result.audio, fmt))
        # The cheap signal checks (quality/) on every result, or a best-of-N's full report; shown in the
        # summary and the history.
        report = gated.report if gated is not None else QualityScorer().score(result.audio, result.text, {"signal"},
                                                                              seed=result.seed)
        takes = len(gated.reports) if gated is not None else 1
        self.metrics.observe_quality("ui_" + op.split(":")[0].split(" ")[0], report, takes=takes)
        state["items"].append({"n": len(state["items"]) + 1, "op": op, "text": result.text, "path": str(path),
                               "source": str(source), "seed": int(result.seed),
                               "ms": round(result.timings.total_ms, 1), "quality": quality_cell(report)})
        state["base"] = None  # the next edit applies to this new result
        choices = history_choices(state)
        return (str(path), timing_table(result), summary(result) + " · " + quality_line(report, takes), state,
                gr.update(choices=choices, value=len(state["items"]) - 1), history_table(state), base_note(state))

    def _write(self, path: Path, data: bytes) -> Path:
        try:
            path.write_bytes(data)
        except OSError as exc:  # full or read-only disk: say so instead of a generic internal error
            log.error("cannot write %s: %s", path, exc)
            with contextlib.suppress(OSError):  # a partial file must not be served later
                path.unlink()
            raise StudioError(f"the result was made but could not be saved for the page ({exc.strerror or exc}); "
                              "free some disk space on the server") from None
        return path

    def _prune(self) -> None:
        """Drop output files older than a day (the history of a day-old page is gone anyway)."""
        cutoff = time.time() - OUTPUT_MAX_AGE_S
        try:
            files = list(self.output_dir.iterdir())
        except OSError:
            return
        for old in files:
            try:
                if old.stat().st_mtime < cutoff:
                    os.remove(old)
            except OSError:
                continue


# ---------------------------------------------------------------------- pure view helpers

def timing_table(result: Result) -> str:
    """The request's stages as a Markdown table (stage, ms, whether it came from the cache)."""
    t = result.timings
    lines = ["| stage | ms | cache |", "|---|---:|---|"]
    lines += [f"| {stage} | {ms:.1f} | {'hit' if stage in t.cached else ''} |" for stage, ms in t.stages_ms.items()]
    return "\n".join(lines)


def summary(result: Result) -> str:
    t = result.timings
    parts = [f"**total** {t.total_ms:.0f} ms"]
    if "ttfa_ms" in t.counters:
        parts.append(f"**first audio** {t.counters['ttfa_ms']:.0f} ms")
    if math.isfinite(t.rtf):
        parts.append(f"**RTF** {t.rtf:.2f}")
    parts.append(f"audio {result.audio.duration:.2f} s")
    parts.append(f"seed {result.seed}")
    parts.append("cache hits: " + (", ".join(sorted(t.cached)) if t.cached else "none"))
    return " · ".join(parts)


def quality_line(report: QualityReport, takes: int = 1) -> str:
    """A result's checks, for its summary line: the signal checks, and the content and speaker scores
    when they were measured (best-of-N on an engine with the models)."""
    signal = report.signal
    parts = [f"**checks** {signal.lufs:.1f} LUFS" if signal.lufs is not None else "**checks** loudness n/a",
             f"peak {signal.peak:.2f}"]
    if signal.duration_ratio is not None:
        parts.append(f"pace ×{signal.duration_ratio:.2f}")
    if report.error is not None:
        parts.append(f"{report.content.measure.upper()} {report.error:.2f}")
    if report.similarity is not None:
        parts.append(f"voice similarity {report.similarity:.2f}")
    if takes > 1:
        parts.append(f"best of {takes}")
    parts.append(("⚠ " + ", ".join(f.replace("_", " ") for f in signal.flags)) if signal.flags else "✓ checks ok")
    return " · ".join(parts)


def quality_cell(report: QualityReport) -> str:
    """A result's checks, short, for the history table."""
    signal = report.signal
    cell = f"{signal.lufs:.0f} LUFS" if signal.lufs is not None else "-"
    if report.error is not None:
        cell += f"; {report.content.measure.upper()} {report.error:.2f}"
    if report.similarity is not None:
        cell += f"; sim {report.similarity:.2f}"
    return cell + ("; " + ", ".join(signal.flags) if signal.flags else "; ok")


def _candidates(value: float | None) -> int:
    n = 1 if value in (None, "") else int(value)
    if not 1 <= n <= MAX_CANDIDATES:
        raise gr.Error(f"Candidates must be from 1 to {MAX_CANDIDATES}.", title="Bad value")
    return n


def history_choices(state: dict) -> list[tuple[str, int]]:
    return [(f"#{item['n']} {item['op']}: {_short(item['text'])}", i) for i, item in enumerate(state["items"])]


def history_table(state: dict) -> str:
    """The clone -> edit chain as a Markdown table (Gradio 6.17's Dataframe does not redraw added rows)."""
    if not state["items"]:
        return "No results yet."
    lines = ["| # | operation | text | seed | total ms | checks |", "|---:|---|---|---:|---:|---|"]
    lines += [f"| {item['n']} | {_cell(item['op'])} | {_cell(_short(item['text'], 60))} | {item['seed']} "
              f"| {item['ms']:.0f} | {_cell(item.get('quality', ''))} |" for item in state["items"]]
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def base_note(state: dict) -> str:
    if not state["items"]:
        return "Edits apply to the last result. Clone something first."
    item = state["items"][_base_index(state)]
    return f"Edits apply to **#{item['n']} {item['op']}**: “{_short(item['text'], 80)}”"


def _base_index(state: dict) -> int:
    base = state.get("base")
    return base if base is not None and 0 <= base < len(state["items"]) else len(state["items"]) - 1


def _copy_state(state: dict | None) -> dict:
    if not state:
        return new_state()
    return {"items": [dict(item) for item in state.get("items", [])], "base": state.get("base")}


def sf_duration(path) -> float:
    """Seconds of an audio file from its header (0 when it cannot be read: the edit then reports why)."""
    import soundfile as sf

    try:
        info = sf.info(str(path))
        return info.frames / info.samplerate
    except (sf.LibsndfileError, RuntimeError, OSError, TypeError):
        return 0.0


def _seed(seed: float | None) -> int | None:
    if seed is None or seed == "" or (isinstance(seed, float) and math.isnan(seed)):
        return None
    return int(seed)


def _short(text: str, limit: int = 40) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _warn_tags(text: str | None) -> None:
    """A page warning naming unknown tags in ``text`` (the text still goes to the engine as it is)."""
    warning = tag_warning(text)
    if warning:
        gr.Warning(warning[0].upper() + warning[1:], title="Unknown tag")


def _progress_adapter(progress):
    def report(fraction: float, description: str) -> None:
        try:
            progress(fraction, desc=description)
        except Exception:  # progress is cosmetic; never fail a request over it
            log.debug("progress update failed", exc_info=True)
    return report

