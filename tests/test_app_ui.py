"""The studio page (web.ui, web.ui_handlers) and the entry point (app.py).

Covers: gradio_client round trips against a real server with the preview engine (clone, edit,
cache_stats, cache_clear and their errors), the history chain and "use as base" through the
handlers, the banner and edit choices, examples loading, and ``app.py --help`` / import without
side effects.
"""

import io
import re
import subprocess
import sys
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import soundfile as sf
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from core import settings as settings_mod
from testkit.studio_server import start_studio

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "en_low.flac"
EXAMPLE_TEXT = "The quiet harbour woke slowly as the first boats went out."


@pytest.fixture(scope="module")
def client(studio):
    return Client(studio.url + "/", verbose=False, download_files=False)


def _clone(client, target="Hello from the studio.", seed=5, fmt="wav"):
    # A 7th output is the streaming player (the chunks joined once the stream ends; absent without ffmpeg).
    return client.predict(handle_file(str(EXAMPLE)), EXAMPLE_TEXT, target, seed, 10, fmt, api_name="/clone")[:6]


@pytest.mark.slow
def test_named_endpoints(client):
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert set(endpoints) == {"/clone", "/edit", "/transcribe", "/cache_stats", "/cache_clear"}


@pytest.mark.slow
def test_clone_edit_and_cache_round_trip(client, studio):
    client.predict("clear", api_name="/cache_clear")
    audio, timings, summary, history, table, base = _clone(client)
    assert audio["url"] and audio["orig_name"].endswith(".wav")
    assert "| prompt_analysis |" in timings and "| hit |" not in timings  # first use of this prompt: computed
    assert "seed 5" in summary and "cache hits: none" in summary
    assert "| 1 | clone | Hello from the studio. | 5 |" in table

    audio2, timings2, summary2, *_ = _clone(client, target="A second sentence.", fmt="mp3")
    assert audio2["orig_name"].endswith(".mp3")
    assert [line for line in timings2.splitlines() if "prompt_analysis" in line][0].endswith("| hit |")
    stats = client.predict(api_name="/cache_stats")
    assert stats["hits"] >= 1 and stats["entries"] == 1

    edited, edit_timings, edit_summary, history, table, base, *_ = client.predict(
        "speed", "slower", "", 1, 10, "wav", api_name="/edit")
    assert [line.split(" | ")[1] for line in table.splitlines()[2:]] == ["clone", "clone", "speed: slower (of #2)"]
    assert "#3 speed: slower" in base
    assert len(history["choices"]) == 3 and history["value"] == 2

    cleared = client.predict("clear", api_name="/cache_clear")
    assert cleared["entries"] == 0 and cleared["hits"] == 0


@pytest.mark.slow
def test_errors_are_specific_messages(client, studio, monkeypatch, tmp_path, caplog):
    with pytest.raises(AppError, match="target text is empty"):
        _clone(client, target="   ")
    with pytest.raises(AppError, match="Upload or record a prompt clip"):
        client.predict(None, EXAMPLE_TEXT, "Hi", 1, 10, "wav", api_name="/clone")
    fresh = Client(studio.url + "/", verbose=False, download_files=False)
    with pytest.raises(AppError, match="Clone something first"):
        fresh.predict("vad", None, "", 1, 10, "wav", api_name="/edit")
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("this is not audio")
    with pytest.raises(AppError, match="could not decode"):   # found by the engine, in the queue
        client.predict(handle_file(str(not_audio)), EXAMPLE_TEXT, "Hi", 1, 10, "wav", api_name="/clone")

    def broken(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(studio.engine, "clone_stream", broken)  # fault injection
    with pytest.raises(AppError) as failure:
        _clone(client)
    message = str(failure.value)
    assert "request id" in message and "secret" not in message
    rid = re.search(r"request id ([0-9a-f]+)", message).group(1)
    # One id: the traceback in the log names the same request as the message and the timing line would.
    logged = [r for r in caplog.records if rid in r.getMessage()]
    assert logged and any("secret internal detail" in (r.exc_text or "") for r in logged)


# ------------------------------------------------------------------ handlers without a server

@pytest.fixture
def handlers(tmp_path):
    from funasr_cache.store import PromptCache
    from preview.engine import PreviewEngine
    from web.ui_handlers import Handlers

    s = settings_mod.load_settings(["--cache-dir", str(tmp_path / "cache")], env={})
    return Handlers(PreviewEngine(s, PromptCache.from_settings(s)), s, output_dir=tmp_path / "out")


def test_history_use_as_base_and_play(handlers):
    from web.ui_handlers import new_state

    *_, state, _, _, _ = handlers.clone(str(EXAMPLE), EXAMPLE_TEXT, "First take.", 1, 10, "wav", new_state())
    *_, state, _, _, _ = handlers.edit("vad", None, "", 2, 10, "wav", state)
    assert [item["op"] for item in state["items"]] == ["clone", "vad (of #1)"]
    # Go back to the clone and edit it again: the new item says it was made from #1.
    state, note = handlers.use_as_base(0, state)
    assert "#1 clone" in note
    *_, state, _, _, _ = handlers.edit("speed", "faster", "", 3, 10, "flac", state)
    assert state["items"][-1]["op"] == "speed: faster (of #1)"
    path = handlers.select(2, state)
    samples, rate = sf.read(path)
    first, _ = sf.read(handlers.select(0, state))
    assert rate == 24000 and path.endswith(".flac") and len(samples) < len(first)
    assert handlers.select(7, state) is None
    with pytest.raises(gr.Error):
        handlers.use_as_base(None, state)


def test_edit_choices_flag_unavailable_options(handlers):
    from web.ui import banner, edit_option_choices, edit_type_choices

    caps = handlers.engine.capabilities()
    types = dict((value, label) for label, value in edit_type_choices(caps))
    assert types["paralinguistic"] == "paralinguistic (unavailable)" and types["vad"] == "vad"
    emotion = next(c for c in caps if c.edit_type == "emotion")
    labels = dict((value, label) for label, value in edit_option_choices(emotion))
    for option in emotion.unavailable_options:
        assert labels[option].endswith("(unavailable)")
    assert "Preview engine" in banner(handlers.engine)


def test_examples_are_listed_with_transcripts():
    from web.ui import load_examples

    examples = load_examples()
    assert len(examples) >= 3
    for path, transcript, target in examples:
        samples, rate = sf.read(path)
        assert rate == 16000 and len(samples) / rate > 1.0 and transcript and target
    total = sum(p.stat().st_size for p in (ROOT / "examples").iterdir())
    assert total < 300_000


def test_app_help_lists_every_flag_and_import_is_inert():
    out = subprocess.run([sys.executable, str(ROOT / "app.py"), "--help"], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.returncode == 0
    for flag, *_ in settings_mod.settings_table():
        assert flag in out.stdout
    probe = ("import sys, logging; import app; "
             "assert 'gradio' not in sys.modules and 'uvicorn' not in sys.modules and 'torch' not in sys.modules; "
             "assert not logging.getLogger().handlers")
    assert subprocess.run([sys.executable, "-c", probe], cwd=ROOT, timeout=60).returncode == 0
    bad = subprocess.run([sys.executable, str(ROOT / "app.py"), "--port", "zero"], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert bad.returncode == 2 and "port" in bad.stderr


def test_edits_start_from_the_exact_samples_not_the_lossy_download(handlers, monkeypatch):
    from core.audio_io import load_audio
    from web.ui_handlers import new_state

    made, given = [], []
    real_clone, real_edit = handlers.engine.clone, handlers.engine.edit
    monkeypatch.setattr(handlers.engine, "clone", lambda *a, **k: made.append(real_clone(*a, **k)) or made[-1])
    monkeypatch.setattr(handlers.engine, "edit", lambda audio, *a, **k: given.append(audio) or real_edit(audio, *a, **k))
    path, *_, state, _, _, _ = handlers.clone(str(EXAMPLE), EXAMPLE_TEXT, "Lossy download.", 1, 10, "mp3", new_state())
    handlers.edit("vad", None, "", 2, 10, "opus", state)
    assert path.endswith(".mp3") and not given[0].endswith(".mp3")
    np.testing.assert_array_equal(load_audio(given[0]).samples, made[0].audio.samples)   # bit-exact
    assert sf.info(given[0]).subtype == "FLOAT"


def test_handlers_write_playable_files(handlers):
    from web.ui_handlers import new_state

    path, *_ = handlers.clone(str(EXAMPLE), EXAMPLE_TEXT, "Check the file.", 4, 10, "opus", new_state())
    samples, rate = sf.read(path)
    assert path.endswith(".ogg") and rate in (24000, 48000) and np.abs(samples).max() > 0.01


def test_unwritable_output_folder_is_a_clear_error(handlers):
    import shutil

    from web.ui_handlers import guarded, new_state

    shutil.rmtree(handlers.output_dir)
    handlers.output_dir.write_text("a file where the output folder should be")  # root ignores chmod
    try:
        with pytest.raises(gr.Error, match="could not be saved"):
            guarded(handlers.clone)(str(EXAMPLE), EXAMPLE_TEXT, "No room.", 4, 10, "wav", new_state())
    finally:
        handlers.output_dir.unlink()
        handlers.output_dir.mkdir()


# ------------------------------------------------------------------ the Step-Audio engine on tiny models

@pytest.mark.slow
def test_tiny_model_engine_round_trip(tmp_path):
    """The same UI and API on StepAudioEngine with tiny random-weight models in the real folder layout."""
    import httpx

    from testkit.tiny_models import build_tiny_model_root
    from tts_engine.step_audio import StepAudioEngine

    root = build_tiny_model_root(tmp_path)
    studio = start_studio(tmp_path, StepAudioEngine, "--engine", "step-audio", "--model-root", str(root),
                          "--llm-max-new-tokens", "50", "--bundle-key", "tiny-model-bundle-key")
    try:
        client = Client(studio.url + "/", verbose=False, download_files=False)
        assert not studio.engine.describe().preview
        _, timings, summary, *_ = _clone(client, target="Hello there.")
        assert "| llm_decode |" in timings and "cache hits: none" in summary
        _, timings, summary, *_ = _clone(client, target="Hello again.")
        assert "tokenize_vq02" in summary.split("cache hits:")[1]  # the prompt's tokens came from the cache
        edited, _, edit_summary, _, table, *_ = client.predict("emotion", "happy", "", 1, 2, "wav",
                                                               api_name="/edit")
        assert edited["orig_name"].endswith(".wav") and "emotion: happy (of #2)" in table
        stats = client.predict(api_name="/cache_stats")
        assert set(stats["per_kind"]) == {"tokens", "prompt_features"} and stats["hits"] >= 2

        with httpx.Client(base_url=studio.url, timeout=300) as http:
            voice = http.post("/v1/audio/voices", files={"file": ("p.flac", EXAMPLE.read_bytes(), "audio/flac")},
                              data={"transcript": EXAMPLE_TEXT}).json()
            bundle = http.get(f"/v1/audio/voices/{voice['id']}/export")
            assert set(bundle.headers["x-bundle-entries"].split(",")) == {"tokens", "prompt_features"}
            assert client.predict("clear", api_name="/cache_clear")["entries"] == 0
            imported = http.post("/v1/audio/voices/import", files={"file": ("v.zip", bundle.content)}).json()
            # A bundle signed with this server's key refills the cleared cache: nothing recomputed.
            assert imported["imported"] == ["prompt_features", "tokens"] and imported["recomputed"] == []
            speech = http.post("/v1/audio/speech", json={"input": "Hi.", "voice": imported["id"],
                                                         "response_format": "wav"})
            assert speech.status_code == 200
            assert sf.info(io.BytesIO(speech.content)).samplerate == 24000
    finally:
        studio.stop()


@pytest.mark.slow
def test_ui_requires_key_puts_the_page_behind_a_login(tmp_path):
    import httpx

    studio = start_studio(tmp_path, None, "--api-key", "k3y")  # the login is the default with a key
    try:
        from gradio_client.exceptions import AuthenticationError

        with pytest.raises(AuthenticationError):
            Client(studio.url + "/", verbose=False, download_files=False)
        with pytest.raises(ValueError, match="Could not login"):
            Client(studio.url + "/", auth=("anyone", "wrong"), verbose=False, download_files=False)
        client = Client(studio.url + "/", auth=("anyone", "k3y"), verbose=False, download_files=False)
        assert client.predict(api_name="/cache_stats")["entries"] == 0
        assert httpx.get(studio.url + "/healthz").status_code == 200  # operations stay open
    finally:
        studio.stop()


def test_clone_streaming_plays_each_sentence_before_the_whole_result(handlers):
    from web.ui_handlers import new_state

    outputs = list(handlers.clone_streaming(str(EXAMPLE), EXAMPLE_TEXT, "First sentence. Second one here. Third.",
                                            4, 10, "wav", new_state()))
    *chunks, final = outputs
    assert len(chunks) == 3                                              # one per sentence
    pieces = []
    for out in chunks:
        assert all(isinstance(o, type(gr.skip())) for o in out[:7])      # nothing else changes while streaming
        samples, rate = sf.read(io.BytesIO(out[7]), dtype="float32")
        assert rate == 24000 and samples.size > 0
        pieces.append(samples)
    path, timings, summary, state, *_ = final[:7]
    assert isinstance(final[7], type(gr.skip()))
    whole, _ = sf.read(path, dtype="float32")
    assert whole.size == sum(p.size for p in pieces)                     # the history keeps the full result
    assert state["items"][-1]["path"] == path and "**first audio**" in summary
