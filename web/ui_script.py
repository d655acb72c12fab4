"""The page's "Script" tab: productions made segment by segment, take by take.

Owns: the tab's layout (paste or upload a script, text or SRT; cast each speaker to a stored voice;
generate with per-segment progress; the segment table; per segment: play the chosen take, change the
text, regenerate, edit a take into a new take, pick a take; render and download the audio, SRT, WebVTT
and manifest; reopen an earlier production) and its handlers.
Does not own: what productions do (``productions.service``), the other tabs (``web.ui``).

Every handler goes through ``guarded`` (studio errors show their message, anything else a request id).
Generation runs in the production service's pool; the "Generate" event only watches the job, so the
table updates as each segment's take lands.
"""

from __future__ import annotations

import logging
from pathlib import Path

import gradio as gr

from core.edit_options import EDIT_TYPES
from productions.script import parse_script, speakers_of
from web.ui_handlers import guarded

log = logging.getLogger(__name__)

MAX_CAST = 6
SEGMENT_HEADERS = ["#", "speaker", "text", "state", "takes", "chosen take", "seconds", "note"]
EXAMPLE_SCRIPT = "Alice: Good morning. The harbour is quiet today.\nBob: Then let us walk along the water."
_NO_VOICE = "(no stored voices: create one on the Clone tab or POST /v1/audio/voices)"


class ScriptHandlers:
    """The tab's callbacks over one ``ProductionService`` and the voice store."""

    def __init__(self, service, voices, output_dir: Path) -> None:
        self.service, self.voices = service, voices
        self.output_dir = Path(output_dir)

    # ------------------------------------------------------------------ views

    def voice_choices(self) -> list[tuple[str, str]]:
        return [(f"{v.name} ({v.id})", v.id) for v in self.voices.list()]

    def production_choices(self) -> list[tuple[str, str]]:
        return [(f"{p.title} · {len(p.segments)} segments ({p.id})", p.id) for p in self.service.store.list()]

    def table(self, production_id: str | None) -> list[list]:
        if not production_id:
            return []
        production = self.service.store.get(production_id)
        problems = self.service.voice_problems(production)
        rows = []
        for s in production.segments:
            chosen = s.chosen
            rows.append([s.position + 1, s.speaker, s.text, s.state, len(s.takes),
                         chosen.id if chosen else "", round(chosen.duration_ms / 1000, 2) if chosen else "",
                         problems.get(s.id) or _review(chosen) or s.note])
        return rows

    def segment_choices(self, production_id: str | None) -> list[tuple[str, str]]:
        if not production_id:
            return []
        return [(f"#{s.position + 1} {s.speaker + ': ' if s.speaker else ''}{s.text[:60]}", s.id)
                for s in self.service.store.get(production_id).segments]

    # ------------------------------------------------------------------ casting

    def cast(self, script: str, source: str):
        """The cast rows for the script's speakers (one "voice" row for text and SRT), voices assigned in turn."""
        voices = self.voice_choices() or [(_NO_VOICE, "")]
        speakers = speakers_of(parse_script(script, self.service.segment_chars)) if source == "script" else ["voice"]
        if len(speakers) > MAX_CAST:
            raise gr.Error(f"the page casts at most {MAX_CAST} speakers; use the API for more ({len(speakers)} here)")
        updates = []
        for i in range(MAX_CAST):
            if i < len(speakers):
                updates.append(gr.update(visible=True, choices=voices, value=voices[i % len(voices)][1],
                                         label=f"Voice for {speakers[i]}" if source == "script" else "Voice"))
            else:
                updates.append(gr.update(visible=False, value=None))
        return [speakers, *updates]

    # ------------------------------------------------------------------ generating

    def create_and_generate(self, title: str, script: str, source: str, fit: bool, speakers: list[str], *cast_values):
        """Create the production and generate all of it; yields (production id, table, progress, pickers)."""
        cast_values = cast_values[:MAX_CAST]
        if source == "script":
            if not speakers:
                speakers = self.cast(script, source)[0]
            production = self.service.create(title, "script", script, cast=dict(zip(speakers, cast_values)))
        else:
            production = self.service.create(title, source, script, voice=cast_values[0], fit_to_cue=fit)
        yield from self._watch(production.id, self.service.generate(production.id))

    def generate_pending(self, production_id: str | None):
        if not production_id:
            raise gr.Error("create or open a production first")
        yield from self._watch(production_id, self.service.generate(production_id))

    def regenerate(self, production_id: str | None, segment_id: str | None):
        if not production_id or not segment_id:
            raise gr.Error("pick a segment first")
        yield from self._watch(production_id, self.service.generate(production_id, [segment_id]))

    def _watch(self, production_id: str, job):
        version = -1
        while True:
            version = job.wait_change(version, 1.0)
            snap = job.snapshot()
            progress = (f"Job {job.id}: {snap['counts']['ready']} ready, {snap['counts']['failed']} failed, "
                        f"{snap['counts']['generating']} generating, {snap['counts']['queued']} queued "
                        f"of {len(snap['segments'])}")
            segs = self.segment_choices(production_id)
            current = snap["segments"][0]["id"] if len(snap["segments"]) == 1 else (segs[0][1] if segs else None)
            yield (production_id, self.table(production_id), progress,
                   gr.update(choices=self.production_choices(), value=production_id),
                   gr.update(choices=segs, value=current))
            if snap["done"]:
                return

    # ------------------------------------------------------------------ one segment

    def open_production(self, production_id: str | None):
        segs = self.segment_choices(production_id)
        return (production_id, self.table(production_id), gr.update(choices=segs, value=segs[0][1] if segs else None))

    def show_segment(self, production_id: str | None, segment_id: str | None):
        """The segment's text, its takes (chosen first) and the chosen take's audio."""
        if not production_id or not segment_id:
            return "", gr.update(choices=[], value=None), None
        seg = self.service.store.segment(production_id, segment_id)
        takes = [(f"{t.id} · {t.source} · seed {t.seed} · {t.duration_ms / 1000:.2f} s"
                  + (" (chosen)" if t.id == seg.chosen_take_id else ""), t.id) for t in seg.takes]
        chosen = seg.chosen_take_id or (seg.takes[-1].id if seg.takes else None)
        return seg.text, gr.update(choices=takes, value=chosen), self._take_file(production_id, segment_id, chosen)

    def _take_file(self, production_id: str, segment_id: str, take_id: str | None) -> str | None:
        if not take_id:
            return None
        path = self.output_dir / "takes" / f"{take_id}.wav"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(self.service.take_audio(production_id, segment_id, take_id))
        return str(path)

    def play_take(self, production_id, segment_id, take_id):
        return self._take_file(production_id, segment_id, take_id) if production_id and segment_id else None

    def save_text(self, production_id, segment_id, text):
        if not production_id or not segment_id:
            raise gr.Error("pick a segment first")
        self.service.update_segment(production_id, segment_id, {"text": text})
        return self.table(production_id)

    def choose(self, production_id, segment_id, take_id):
        if not (production_id and segment_id and take_id):
            raise gr.Error("pick a segment and one of its takes")
        self.service.choose(production_id, segment_id, take_id)
        return (self.table(production_id), *self.show_segment(production_id, segment_id)[1:])

    def edit(self, production_id, segment_id, take_id, edit_type, edit_info):
        if not (production_id and segment_id and take_id):
            raise gr.Error("pick a segment and one of its takes")
        self.service.edit_take(production_id, segment_id, take_id, edit_type, edit_info or None)
        return (self.table(production_id), *self.show_segment(production_id, segment_id)[1:])

    # ------------------------------------------------------------------ rendering

    def render(self, production_id: str | None, fmt: str):
        if not production_id:
            raise gr.Error("create or open a production first")
        rendered = self.service.render(production_id, fmt)
        m = rendered.manifest["render"]
        summary = (f"{m['duration_s']:.1f} s, {len(rendered.manifest['segments'])} segments, loudness "
                   f"{m['loudness_lufs'] if m['loudness_lufs'] is not None else '—'} LUFS "
                   f"(target {m['loudness_target_lufs']}), gain {m['gain_db']:+.1f} dB"
                   + (" (held back by the -1 dBFS peak ceiling)" if m["loudness_lufs"] is not None
                      and m["loudness_lufs"] < m["loudness_target_lufs"] - 0.05 else ""))
        return (str(rendered.audio), [str(rendered.audio), str(rendered.srt), str(rendered.vtt),
                                      str(rendered.manifest_path)], summary)

    def load_file(self, path: str | None, current: str) -> tuple[str, str]:
        """An uploaded .txt / .srt file into the script box (and the source guessed from its name)."""
        if not path:
            return current, gr.update()
        data = Path(path).read_bytes()
        limit = self.service.settings.production_max_chars * 4
        if len(data) > limit:
            raise gr.Error(f"the file is larger than {limit:,} bytes")
        text = data.decode("utf-8-sig", errors="replace")
        return text, ("srt" if path.lower().endswith(".srt") else gr.update())


def build_script_tab(service, voices, settings, output_dir: Path, events: dict, quick: dict) -> None:
    """The "Script" tab, inside the caller's ``gr.Tabs``."""
    h = ScriptHandlers(service, voices, output_dir)
    edit_types = [t for t in EDIT_TYPES if t != "paralinguistic"]
    with gr.Tab("Script", id="script_tab"):
        production_id = gr.State(None)
        speakers = gr.State([])
        with gr.Row():
            with gr.Column(scale=3):
                title = gr.Textbox(label="Title", value="", elem_id="script_title")
                source = gr.Radio([("Script with speakers (Name: line / [S1] line)", "script"),
                                   ("Plain text", "text"), ("SRT subtitles", "srt")], value="script",
                                  label="What the box holds", elem_id="script_source")
                script = gr.Textbox(label="Script", lines=10, value=EXAMPLE_SCRIPT, elem_id="script_text",
                                    max_length=settings.production_max_chars)
                upload = gr.File(label="…or load a .txt / .srt file", file_types=[".txt", ".srt"], type="filepath",
                                 elem_id="script_file")
                fit = gr.Checkbox(label="SRT: speed takes up to fit their cue", value=False, elem_id="script_fit")
            with gr.Column(scale=2):
                cast_btn = gr.Button("Cast speakers", elem_id="script_cast_btn")
                cast = [gr.Dropdown([], label=f"Voice {i + 1}", visible=False, elem_id=f"script_cast_{i}")
                        for i in range(MAX_CAST)]
                generate = gr.Button("Create and generate", variant="primary", elem_id="script_generate")
                progress = gr.Markdown(elem_id="script_progress")
                with gr.Row():
                    productions = gr.Dropdown(h.production_choices(), label="Open a production",
                                              elem_id="script_production", allow_custom_value=True)
                    pending_btn = gr.Button("Generate pending", size="sm", elem_id="script_pending")
        segments = gr.Dataframe(headers=SEGMENT_HEADERS, value=[], interactive=False, wrap=True,
                                label="Segments", elem_id="script_segments")
        with gr.Row():
            with gr.Column():
                seg_pick = gr.Dropdown([], label="Segment", elem_id="script_seg_pick")
                seg_text = gr.Textbox(label="Segment text", lines=2, elem_id="script_seg_text")
                with gr.Row():
                    save_btn = gr.Button("Save text (makes it pending)", size="sm", elem_id="script_seg_save")
                    regen_btn = gr.Button("Regenerate this segment", size="sm", elem_id="script_regenerate")
            with gr.Column():
                take_pick = gr.Dropdown([], label="Takes", elem_id="script_take_pick")
                take_audio = gr.Audio(label="Take", type="filepath", interactive=False, elem_id="script_take_audio")
                choose_btn = gr.Button("Use this take", size="sm", elem_id="script_choose")
                with gr.Row():
                    edit_type = gr.Dropdown(edit_types, value="speed", label="Edit the take", elem_id="script_edit_type")
                    edit_info = gr.Dropdown(list(EDIT_TYPES["speed"]), value="faster", label="Option",
                                            allow_custom_value=True, elem_id="script_edit_info")
                edit_btn = gr.Button("Edit into a new take", size="sm", elem_id="script_edit")
        with gr.Row():
            fmt = gr.Radio(["wav", "flac", "mp3", "opus"], value="wav", label="Render format", elem_id="script_format")
            render_btn = gr.Button("Render", variant="primary", elem_id="script_render")
        render_summary = gr.Markdown(elem_id="script_render_summary")
        render_audio = gr.Audio(label="Render", type="filepath", interactive=False, elem_id="script_render_audio")
        render_files = gr.File(label="Downloads: audio, SRT, WebVTT, manifest", file_count="multiple",
                               interactive=False, elem_id="script_downloads")

    watch_outputs = [production_id, segments, progress, productions, seg_pick]
    seg_outputs = [seg_text, take_pick, take_audio]
    # Every event is private and named "script_*" explicitly, so none takes a name of the other tabs.
    # Watching a job or rendering does no engine work (generation runs in the service's pool): their own
    # queue group, so a long production never holds the engine slots the Clone and Edit tabs need.
    queued = {"concurrency_limit": 8, "concurrency_id": "script", "api_visibility": "private"}
    engine_queued = {**events, "api_visibility": "private"}

    def named(name: str, kind: dict) -> dict:
        return {**kind, "api_name": f"script_{name}"}

    def then_show(event, name: str) -> None:
        # When a job ends, the picked segment's takes are shown again (the picker's value may not have changed).
        event.then(guarded(h.show_segment), [production_id, seg_pick], seg_outputs, **named(name, quick))

    upload.upload(guarded(h.load_file), [upload, script], [script, source], **named("load_file", quick))
    cast_btn.click(guarded(h.cast), [script, source], [speakers, *cast], **named("cast", quick))
    source.change(guarded(h.cast), [script, source], [speakers, *cast], **named("cast_source", quick))
    then_show(generate.click(guarded(h.create_and_generate), [title, script, source, fit, speakers, *cast],
                             watch_outputs, **named("generate", queued)), "generate_show")
    then_show(pending_btn.click(guarded(h.generate_pending), production_id, watch_outputs,
                                **named("generate_pending", queued)), "pending_show")
    then_show(regen_btn.click(guarded(h.regenerate), [production_id, seg_pick], watch_outputs,
                              **named("regenerate", queued)), "regenerate_show")
    productions.change(guarded(h.open_production), productions, [production_id, segments, seg_pick],
                       **named("open", quick))
    seg_pick.change(guarded(h.show_segment), [production_id, seg_pick], seg_outputs, **named("segment", quick))
    take_pick.change(guarded(h.play_take), [production_id, seg_pick, take_pick], take_audio, **named("take", quick))
    save_btn.click(guarded(h.save_text), [production_id, seg_pick, seg_text], segments, **named("save_text", quick))
    choose_btn.click(guarded(h.choose), [production_id, seg_pick, take_pick], [segments, take_pick, take_audio],
                     **named("choose", quick))
    edit_btn.click(guarded(h.edit), [production_id, seg_pick, take_pick, edit_type, edit_info],
                   [segments, take_pick, take_audio], **named("edit_take", engine_queued))
    edit_type.change(lambda t: gr.update(choices=list(EDIT_TYPES.get(t, ())), value=(EDIT_TYPES.get(t) or (None,))[0]),
                     edit_type, edit_info, **named("edit_type", quick))
    render_btn.click(guarded(h.render), [production_id, fmt], [render_audio, render_files, render_summary],
                     **named("render", queued))


def _review(take) -> str:
    """A note when the chosen take's quality scores ask for a listen (failed checks or signal flags)."""
    if take is None or not take.scores:
        return ""
    if take.scores.get("passed", 1.0) < 1.0:
        return "review: the take failed its quality checks"
    flags = int(take.scores.get("flags", 0))
    return f"review: {flags} signal flag(s) (silence, clipping or length)" if flags else ""
