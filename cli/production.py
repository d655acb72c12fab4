"""``studio-batch script``: render a script file with a cast to audio and captions, from the shell.

Owns: the ``script`` command -- reading the script (a speaker script, plain text, or SRT, by ``--source`` or
the file's suffix), the cast (``--cast NAME=VOICE``; ``--voice VOICE`` for text and SRT), where VOICE is a
stored voice id or an audio file (its transcript from ``<clip>.txt`` beside it, else the engine's ASR),
generating every segment together with a progress bar, rendering, and writing ``<out>/<name>.<format>``
with ``.srt``, ``.vtt`` and ``.json`` (the manifest) beside it. The exit status: 0 written, 1 segments
failed (named; nothing rendered), 2 bad arguments or no engine.
Does not own: productions (``productions.service``), the engine (``tts_engine.select``), settings.

The production is stored in the user-data database (``--data-dir`` / ``--database-url``) like one made on
the page, so it can be opened there afterwards; voices given as files exist only for this run, so the
page shows their segments as having no stored voice.

Example::

    studio-batch script dialogue.txt --cast Alice=alice.wav --cast Bob=bob-5e6f7a8b --out out/ --format mp3
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

log = logging.getLogger("cli")
SOURCES = ("script", "text", "srt")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="studio-batch script",
                                description="Render a script (speakers and a cast), a text or an SRT file to audio + captions.",
                                epilog="Any app.py flag (--engine, --data-dir, --cache-dir, --production-loudness-lufs, ...) "
                                       "works here too.")
    p.add_argument("script", type=Path, help="a UTF-8 file: 'Name: line' / '[S1] line' script, plain text, or .srt")
    p.add_argument("--source", choices=SOURCES, default=None, help="what the file holds (default: srt for .srt, else script)")
    p.add_argument("--cast", action="append", default=[], metavar="NAME=VOICE",
                   help="a speaker and its voice: a stored voice id or an audio file (repeatable)")
    p.add_argument("--voice", default=None, help="text and srt: the voice (stored id or audio file)")
    p.add_argument("--title", default="", help="the production's title (default: the file's name)")
    p.add_argument("--fit-to-cue", action="store_true", help="srt: speed takes up to fit their cue")
    p.add_argument("--out", type=Path, required=True, help="output folder (created if missing)")
    p.add_argument("--format", default="wav", choices=("wav", "flac", "mp3", "opus"), help="audio format")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


class CastVoices:
    """Stored voices, plus audio files given on the command line under ids of their own (``file-<n>``)."""

    def __init__(self, stored, engine) -> None:
        self.stored, self.engine = stored, engine
        self.files: dict[str, tuple[Path, str]] = {}

    def add(self, value: str) -> str:
        """The voice id for ``value`` (a stored id, or an audio file registered now)."""
        from core.errors import InputError

        path = Path(value)
        if not path.is_file():
            return value
        sidecar = path.with_suffix(".txt")
        text = sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else ""
        if not text:
            transcript = self.engine.transcribe(path)
            log.info("%s: transcribed as %r", path.name, transcript.text)
            text = transcript.text
        if not text:
            raise InputError(f"{path.name}: no transcript (write it into {sidecar.name})")
        voice_id = f"file-{len(self.files) + 1}"
        self.files[voice_id] = (path, text)
        return voice_id

    def get(self, voice_id: str):
        if voice_id in self.files:
            return _FileVoice(voice_id, self.files[voice_id][1])
        return self.stored.get(voice_id)

    def audio(self, voice_id: str):
        from core.audio_io import load_audio

        if voice_id in self.files:
            return load_audio(self.files[voice_id][0], what=f"the voice file {self.files[voice_id][0].name}")
        return self.stored.audio(voice_id)


class _FileVoice:
    def __init__(self, voice_id: str, transcript: str) -> None:
        self.id, self.name, self.transcript = voice_id, voice_id, transcript


def main(argv: list[str], settings_argv: list[str] | None = None) -> int:
    """Run ``studio-batch script``; returns the exit status."""
    from core.settings import load_settings

    args, rest = parser().parse_known_args(argv)
    try:
        settings = load_settings(rest)
    except SystemExit:
        return 2
    except ValueError as exc:
        print(f"studio-batch script: {exc}", file=sys.stderr)
        return 2
    from cli.batch import _configure_logging

    _configure_logging(settings.log_level)
    from core.errors import StudioError

    source = args.source or ("srt" if args.script.suffix.lower() == ".srt" else "script")
    try:
        content = args.script.read_text(encoding="utf-8-sig")
        cast = dict(item.split("=", 1) for item in args.cast if "=" in item)
        if len(cast) != len(args.cast):
            raise ValueError("--cast takes NAME=VOICE")
        if source == "script" and not cast:
            raise ValueError("a script needs --cast NAME=VOICE for each speaker")
        if source != "script" and not args.voice:
            raise ValueError(f"--source {source} needs --voice")
        args.out.mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        print(f"studio-batch script: {exc}", file=sys.stderr)
        return 2

    from productions.script import check_cast, parse_script, speakers_of

    if source == "script":   # a script or cast mistake is refused before the engine loads
        try:
            check_cast(speakers_of(parse_script(content, min(settings.text_chunk_chars, settings.max_text_chars))), cast)
        except StudioError as exc:
            print(f"studio-batch script: {exc}", file=sys.stderr)
            return 2

    from core.devices import configure_threads
    from productions.service import ProductionService
    from productions.take_checks import take_checker
    from tts_engine.select import create_engine
    from userdata.db import open_database
    from userdata.productions import ProductionStore
    from userdata.voices import VoiceStore

    configure_threads(settings.torch_threads)
    try:
        engine = create_engine(settings)
    except StudioError as exc:
        log.error("cannot start: %s", exc)
        return 2
    db = service = None
    try:
        db = open_database(settings)
        voices = CastVoices(VoiceStore(db, settings.voice_max_count, settings.voice_max_bytes), engine)
        cast = {name.strip(): voices.add(value.strip()) for name, value in cast.items()}
        voice = voices.add(args.voice) if args.voice else None
        service = ProductionService(engine, ProductionStore(db), voices, settings,
                                    renders_dir=Path(settings.cache_dir) / "renders",
                                    scorer=take_checker(engine, settings))   # as on the page: scores, word captions
        production = service.create(args.title or args.script.stem, source, content, voice=voice, cast=cast,
                                    fit_to_cue=args.fit_to_cue)
        log.info("production %s: %d segment(s); generating", production.id, len(production.segments))
        started = time.perf_counter()
        job = service.generate(production.id)
        _follow(job, args.no_progress)
        failed = [s for s in job.snapshot()["segments"] if s["state"] == "failed"]
        if failed:
            for s in failed:
                log.error("segment %s failed: %s", s["id"], s["error"])
            log.error("%d segment(s) failed; nothing rendered (the production %s is stored: retry on the page "
                      "or with the API)", len(failed), production.id)
            return 1
        generated = time.perf_counter() - started
        rendered = service.render(production.id, args.format)
        stem = args.out / (args.script.stem or production.id)
        written = []
        for src, suffix in ((rendered.audio, "." + ("ogg" if args.format == "opus" else args.format)),
                            (rendered.srt, ".srt"), (rendered.vtt, ".vtt"), (rendered.manifest_path, ".json")):
            shutil.copyfile(src, stem.with_suffix(suffix))
            written.append(stem.with_suffix(suffix).name)
        m = rendered.manifest["render"]
        log.info("done: %s in %s; %.1f s of audio, generated in %.1f s, loudness %s LUFS", ", ".join(written),
                 args.out, m["duration_s"], generated, m["loudness_lufs"])
        return 0
    except StudioError as exc:
        log.error("studio-batch script: %s", exc)
        return 2
    finally:
        if service is not None:
            service.close()
        if db is not None:
            db.close()
        engine.close()


def _follow(job, no_progress: bool) -> None:
    from tqdm import tqdm

    total = len(job.snapshot()["segments"])
    with tqdm(total=total, desc="segments", unit="seg", file=sys.stderr, disable=no_progress, dynamic_ncols=True) as bar:
        version = -1
        while True:
            version = job.wait_change(version, 1.0)
            snap = job.snapshot()
            bar.n = snap["counts"]["ready"] + snap["counts"]["failed"]
            bar.refresh()
            if snap["done"]:
                return
