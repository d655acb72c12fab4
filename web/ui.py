"""The studio page: Gradio Blocks layout and event wiring.

Owns: ``build_demo(engine, settings) -> gr.Blocks`` -- the engine banner, the Clone and Edit
tabs, the tag palettes (a click inserts the tag at the text box's cursor, in the browser), the
polyphone hint, the history panel, the bundled examples, the "Prompt cache" accordion, the queue
and the named API endpoints (``/clone``, ``/edit``, ``/transcribe``, ``/cache_stats``,
``/cache_clear``; helpers are private).
Does not own: what the buttons do (``web.ui_handlers``) or serving (``web.server``).

Clone and edit stream: while the engine works, its audio chunks play in a ``gr.Audio(streaming=True)``
player (Gradio converts chunks with ffmpeg; without ffmpeg the page falls back to whole results);
the file, timings table and history fill in when the result is whole.

Every engine event shares ``concurrency_id="engine"`` with ``settings.concurrency_limit``, so
clones and edits from all sessions queue for the same slots; cache and history events are cheap
and skip the queue. (Gradio 6.17's ``validator=`` is not used: in the browser a second click of an
event with a validator never runs, and a validator cannot see ``gr.State``.)
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

import gradio as gr

from core.edit_options import LANGUAGE_TAGS, PARALINGUISTIC_TAGS
from core.settings import Settings
from quality.gates import MAX_CANDIDATES, MAX_RETRIES
from tts_engine.contract import MAX_EDIT_ITERATIONS, EditCapability, Engine
from web.metrics import Metrics
from web.ui_handlers import CLEAR_CONFIRMATION, UI_FORMATS, Handlers, base_note, guarded, history_table, new_state
from web.ui_script import build_script_tab

log = logging.getLogger(__name__)

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
ENGINE_CONCURRENCY_ID = "engine"
POLYPHONE_HINT = ("Chinese polyphones: write the pinyin with its tone digit in place of the character, e.g. "
                  "我也想guo4guo4guo1儿guo4guo4的生活. A leading [Cantonese], [Sichuanese], [Japanese] or [Korean] "
                  "picks the language.")
TRANSCRIPT_HINT = "Left empty, the clip is transcribed for you on upload (check it: names and numbers may be off)."


def insert_tag_js(elem_id: str, tag: str) -> str:
    """Browser code for a palette button: put ``tag`` at the cursor of ``#elem_id``'s text area
    (replacing a selection), return the new value for Gradio, and put the cursor after the tag."""
    return ("(value) => { const text = value || ''; const tag = " + json.dumps(tag) + "; "
            "const box = document.querySelector('#" + elem_id + " textarea'); "
            "const start = box && box.selectionStart != null ? box.selectionStart : text.length; "
            "const end = box && box.selectionEnd != null ? box.selectionEnd : start; "
            "const next = text.slice(0, start) + tag + text.slice(end); "
            # Set the box first, so that Gradio's update (the same value) leaves the cursor alone.
            "if (box) { box.value = next; box.focus(); box.setSelectionRange(start + tag.length, start + tag.length); "
            "box.dispatchEvent(new Event('input', {bubbles: true})); } return next; }")


def tag_palette(tags: tuple[str, ...], target: gr.Textbox, elem_id: str, label: str) -> None:
    """A row of small buttons; each inserts its tag into ``target`` at the cursor (no server round trip)."""
    gr.Markdown(label, elem_classes="tag-palette-label")
    with gr.Row(elem_id=elem_id, elem_classes="tag-palette"):
        for tag in tags:
            # Wide enough for its label (Gradio's row then wraps the buttons instead of squeezing them).
            button = gr.Button(tag, size="sm", scale=0, min_width=8 * len(tag) + 28)
            button.click(None, target, target, js=insert_tag_js(target.elem_id, tag), queue=False,
                         api_visibility="private")


def banner(engine: Engine) -> str:
    info = engine.describe()
    if info.preview:
        return f"### ⚠️ {info.name} · {info.device}\n**Preview engine, not Step-Audio-EditX.** {info.detail}"
    return f"### {info.name} · {info.device}\n{info.detail}"


def load_examples(folder: Path = EXAMPLES_DIR) -> list[list[str]]:
    """[[wav path, transcript, target text], ...] from ``examples/examples.json`` (empty if absent)."""
    index = folder / "examples.json"
    if not index.is_file():
        return []
    try:
        rows = json.loads(index.read_text())
        return [[str(folder / r["audio"]), r["transcript"], r["target"]] for r in rows
                if (folder / r["audio"]).is_file()]
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("examples/examples.json is unusable (%s); the page shows no examples", exc)
        return []


def cache_line(stats: dict | None) -> str:
    """One line over the cache JSON: hits, misses, hit rate, entries, size, time saved."""
    if not stats:
        return ""
    parts = [f"hits {stats.get('hits', 0)}", f"misses {stats.get('misses', 0)}"]
    if isinstance(stats.get("hit_rate"), (int, float)):
        parts.append(f"hit rate {100 * stats['hit_rate']:.0f}%")
    parts.append(f"entries {stats.get('entries', 0)}")
    if isinstance(stats.get("bytes"), (int, float)):
        parts.append(f"{stats['bytes'] / 1024:.1f} KiB")
    if isinstance(stats.get("seconds_saved"), (int, float)):
        parts.append(f"saved {stats['seconds_saved']:.1f} s")
    return " · ".join(parts)


def edit_type_choices(caps: tuple[EditCapability, ...]) -> list[tuple[str, str]]:
    return [(c.edit_type if c.available else f"{c.edit_type} (unavailable)", c.edit_type) for c in caps]


def edit_option_choices(cap: EditCapability | None) -> list[tuple[str, str]]:
    if cap is None:
        return []
    return [(f"{o} (unavailable)" if o in cap.unavailable_options or not cap.available else o, o) for o in cap.options]


def build_demo(engine: Engine, settings: Settings, metrics: Metrics | None = None,
               output_dir: Path | None = None, productions=None) -> gr.Blocks:
    """The studio page for ``engine``.

    Parameters:
        engine: the loaded engine (shared by all sessions).
        settings: queue sizes, default flow steps, limits.
        metrics: where UI requests are counted (the server's; a private one when None).
        output_dir: where generated files are written (a fresh temp folder when None).
        productions: the production service, for the "Script" tab (``web.ui_script``); no tab when None.
    """
    h = Handlers(engine, settings, metrics, output_dir)
    # Gradio's streaming player converts each chunk with ffmpeg; without it results show when whole.
    can_stream = shutil.which("ffmpeg") is not None
    if not can_stream:
        log.warning("ffmpeg is not installed: the page plays results once they are whole, not while they stream")
    caps = engine.capabilities()
    by_type = {c.edit_type: c for c in caps}
    first = next((c for c in caps if c.available), caps[0] if caps else None)
    engine_events = dict(concurrency_limit=settings.concurrency_limit, concurrency_id=ENGINE_CONCURRENCY_ID)
    quick = dict(queue=False, api_visibility="private")

    # Gradio's own clean-up of the page's files by age (web.uploads adds the quota, at upload time).
    age = settings.upload_folder_max_age_s
    with gr.Blocks(title="Step-Audio-EditX studio", delete_cache=(max(60, min(3600, age // 4)), age)) as demo:
        state = gr.State(new_state())
        gr.Markdown(banner(engine), elem_id="engine_banner")

        with gr.Tabs():
            with gr.Tab("Clone", id="clone_tab"):
                with gr.Row():
                    with gr.Column():
                        prompt_audio = gr.Audio(label="Prompt clip (the voice to clone)", type="filepath",
                                                sources=["upload", "microphone"], elem_id="prompt_audio")
                        prompt_text = gr.Textbox(label="Prompt transcript (what the clip says)", lines=2,
                                                 elem_id="prompt_text", info=TRANSCRIPT_HINT)
                        transcribe_btn = gr.Button("Transcribe the clip", size="sm", elem_id="transcribe_btn")
                        target_text = gr.Textbox(label="Text to speak", lines=3, elem_id="target_text",
                                                 max_length=settings.max_text_chars, info=POLYPHONE_HINT)
                        tag_palette(LANGUAGE_TAGS + PARALINGUISTIC_TAGS, target_text, "clone_tags", "Insert a tag:")
                        with gr.Row():
                            seed = gr.Number(label="Seed (-1: random)", value=-1, precision=0, elem_id="seed")
                            dice = gr.Button("Random seed", size="sm", elem_id="seed_dice")
                        with gr.Accordion("Advanced", open=False):
                            flow_steps = gr.Slider(1, 50, value=settings.flow_steps, step=1,
                                                   label="Flow-matching steps (fewer is faster)")
                            fmt = gr.Radio(list(UI_FORMATS), value="wav", label="Output format")
                            candidates = gr.Slider(1, MAX_CANDIDATES, value=1, step=1, elem_id="candidates",
                                                   label="Candidates: takes made together; the best by the "
                                                         "quality checks is kept (docs/quality.md)")
                            with gr.Row():
                                max_error = gr.Number(None, label="Max content error (empty: off)", minimum=0,
                                                      maximum=1, step=0.05, elem_id="max_error",
                                                      info="a take whose recognised words differ more (WER; CER "
                                                           "for Chinese) fails")
                                min_similarity = gr.Number(None, label="Min voice similarity (empty: off)", minimum=-1,
                                                           maximum=1, step=0.05, elem_id="min_similarity",
                                                           info="a take less like the prompt's voice fails")
                                retries = gr.Slider(0, MAX_RETRIES, value=0, step=1, elem_id="retries",
                                                    label="Retries: new rounds while no take passes")
                        clone_btn = gr.Button("Clone", variant="primary", elem_id="clone_btn")
                    with gr.Column():
                        stream_audio = gr.Audio(label="Playing as it is generated", streaming=True, autoplay=True,
                                                interactive=False, elem_id="stream_audio", visible=can_stream)
                        out_audio = gr.Audio(label="Result", type="filepath", interactive=False,
                                             buttons=["download"], elem_id="output_audio")
                        out_summary = gr.Markdown(elem_id="clone_summary")
                        out_timings = gr.Markdown(elem_id="clone_timings")
                examples = load_examples()
                if examples:
                    gr.Examples(examples=examples, inputs=[prompt_audio, prompt_text, target_text],
                                label="Example prompts (synthetic eSpeak NG voices, see examples/README.md)")

            with gr.Tab("Edit", id="edit_tab"):
                edit_base = gr.Markdown(base_note(new_state()), elem_id="edit_base")
                with gr.Row():
                    edit_type = gr.Dropdown(edit_type_choices(caps), value=first.edit_type if first else None,
                                            label="Edit", elem_id="edit_type")
                    first_option = first.options[0] if first and first.options else None
                    edit_info = gr.Dropdown(edit_option_choices(first), value=first_option, label="Option",
                                            elem_id="edit_info",
                                            # API callers may pick any type's option; the engine validates it.
                                            allow_custom_value=True)
                edit_note = gr.Markdown(first.note if first else "")
                with gr.Group(visible=first is not None and first.edit_type == "paralinguistic") as para_box:
                    para_text = gr.Textbox(label="New text with tags, e.g. “That was [Laughter] fun”",
                                           elem_id="para_text")
                    tag_palette(PARALINGUISTIC_TAGS, para_text, "para_tags", "Insert a sound at the cursor:")
                iterations = gr.Slider(1, MAX_EDIT_ITERATIONS, value=1, step=1, elem_id="edit_iterations",
                                       label="Strength: apply the edit this many times, each on the last result",
                                       info="Whisper usually needs 2 or more; every pass lands in the history.")
                edit_btn = gr.Button("Apply edit", variant="primary", elem_id="edit_btn")
                edit_stream_audio = gr.Audio(label="Playing as it is generated", streaming=True, autoplay=True,
                                             interactive=False, elem_id="edit_stream_audio", visible=can_stream)
                edit_audio = gr.Audio(label="Edited result", type="filepath", interactive=False,
                                      buttons=["download"], elem_id="edit_audio")
                edit_summary = gr.Markdown()
                edit_timings = gr.Markdown(elem_id="edit_timings")

            if productions is not None:
                build_script_tab(productions, productions.voices, settings, h.output_dir, engine_events, quick)

        with gr.Accordion("History (clone → edit → edit)", open=True, elem_id="history"):
            history_view = gr.Markdown(history_table(new_state()), elem_id="history_table")
            with gr.Row():
                history_pick = gr.Dropdown([], label="Result", elem_id="history_pick")
                use_base = gr.Button("Use as edit base", elem_id="use_base")
            history_audio = gr.Audio(label="Chosen result", type="filepath", interactive=False,
                                     buttons=["download"], elem_id="history_audio")

        with gr.Accordion("Prompt cache", open=False, elem_id="cache_accordion"):
            cache_summary = gr.Markdown(elem_id="cache_summary")
            cache_json = gr.JSON(label="Cache statistics", elem_id="cache_json")
            with gr.Row():
                refresh = gr.Button("Refresh", size="sm", elem_id="cache_refresh")
                clear = gr.Button("Clear…", size="sm", variant="stop", elem_id="cache_clear")
            with gr.Row(visible=False) as confirm_row:
                gr.Markdown("Remove every cached prompt entry? Stored voices stay (their entries come back from the voice database); other clips' entries are recomputed on use.")
                confirm = gr.Button("Yes, clear the cache", variant="stop", size="sm", elem_id="cache_confirm")
                # The named API's explicit confirmation; the page's button sends it.
                confirm_word = gr.Textbox(CLEAR_CONFIRMATION, visible=False, label="confirm")
                cancel = gr.Button("Cancel", size="sm", elem_id="cache_cancel")

        # --------------------------------------------------------------- events
        # The public cache endpoints are wired first so that they own the names cache_stats/cache_clear.
        refresh.click(guarded(h.cache_stats), outputs=cache_json, api_name="cache_stats", queue=False)
        result_outputs = [state, history_pick, history_view, edit_base]
        dice.click(lambda: random.randrange(2**31), outputs=seed, **quick)
        # Results play while they are generated (the streaming player, last output); the file, timings
        # and history follow when the result is whole.
        clone_fn, edit_fn = (h.clone_streaming, h.edit_streaming) if can_stream else (h.clone, h.edit)
        clone_btn.click(guarded(clone_fn), [prompt_audio, prompt_text, target_text, seed, flow_steps, fmt, state,
                                            candidates, retries, max_error, min_similarity],
                        [out_audio, out_timings, out_summary, *result_outputs, *([stream_audio] if can_stream else [])],
                        api_name="clone", **engine_events).then(h.cache_stats, outputs=cache_json, **quick)
        edit_btn.click(guarded(edit_fn), [edit_type, edit_info, para_text, seed, flow_steps, fmt, state, iterations],
                       [edit_audio, edit_timings, edit_summary, *result_outputs,
                        *([edit_stream_audio] if can_stream else [])],
                       api_name="edit", **engine_events).then(h.cache_stats, outputs=cache_json, **quick)

        def on_edit_type(kind: str):
            cap = by_type.get(kind)
            options = edit_option_choices(cap)
            return (gr.update(choices=options, value=options[0][1] if options else None, visible=bool(options)),
                    cap.note if cap else "", gr.update(visible=kind == "paralinguistic"))

        edit_type.change(on_edit_type, edit_type, [edit_info, edit_note, para_box], **quick)
        transcribe_btn.click(guarded(h.transcribe), prompt_audio, prompt_text, api_name="transcribe",
                             **engine_events)
        prompt_audio.upload(h.fill_transcript, [prompt_audio, prompt_text], prompt_text, api_visibility="private",
                            **engine_events)
        history_pick.change(guarded(h.select), [history_pick, state], history_audio, **quick)
        use_base.click(guarded(h.use_as_base), [history_pick, state], [state, edit_base], **quick)

        clear.click(lambda: gr.update(visible=True), outputs=confirm_row, **quick)
        cancel.click(lambda: gr.update(visible=False), outputs=confirm_row, **quick)
        confirm.click(guarded(h.cache_clear), inputs=confirm_word, outputs=cache_json, api_name="cache_clear",
                      queue=False).then(lambda: gr.update(visible=False), outputs=confirm_row, **quick)
        cache_json.change(cache_line, cache_json, cache_summary, **quick)
        demo.load(h.cache_stats, outputs=cache_json, **quick)

    demo.queue(default_concurrency_limit=settings.concurrency_limit, max_size=settings.queue_size)
    h.metrics.set_queue_depth_source(lambda: len(demo._queue))
    return demo
