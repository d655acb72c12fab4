"""Batch clones and edits from the shell, with the server's engine, settings and prompt cache.

Owns: the ``clone`` and ``edit`` commands (argument parsing, turning files, folders and text files
into jobs, output names), the progress bar (tqdm, on stderr), one ``timing`` line per result and a
summary line, and the exit status (0 all done, 1 some job failed, 2 bad arguments or no engine).
Does not own: the engines (``tts_engine.select.create_engine`` picks one exactly as the server does),
settings (every ``app.py`` flag and ``STUDIO_*`` variable works here too), audio formats.

Examples::

    python -m cli clone --voice alice.wav --voice-text "What the clip says." --text-file lines.txt --out out/
    python -m cli clone --voices voices/ --text "Hello there." --instructions "whisper x2, slower" --out out/
    python -m cli edit takes/ --edit-type style --edit-info whisper --iterations 2 --out out/ --engine preview
    python -m cli script dialogue.txt --cast Alice=alice.wav --cast Bob=bob.wav --out out/   (cli.production)

A clip's transcript is ``--voice-text`` / ``--audio-text``, else a ``<clip>.txt`` file beside it,
else the engine's ASR. One failed job is logged and skipped; the others still run.

Outputs are written to a hidden ``.<name>.<random>.part`` file in the output folder, fsynced, then
renamed over the final name (and the folder fsynced), so a final name only ever holds a whole file and
a rerun that skips existing outputs never skips a truncated one. A run holds an exclusive lock on the
output folder (a second run on the same folder is refused), so ``.part`` files found there at start are
leftovers of a killed run and are removed.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import re
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("cli")

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
_EXTENSIONS = {"wav": "wav", "flac": "flac", "mp3": "mp3", "opus": "ogg", "pcm": "pcm"}
MAX_JOBS = 100_000   # a typo such as a whole disk as input should fail fast, not queue forever
PARTIAL = re.compile(r"\..+\.[0-9a-f]{16}\.part")   # what write_atomically leaves if killed mid-write


@dataclass(frozen=True)
class Job:
    """One unit of work: clone ``text`` in the voice of ``source``, or edit ``source``."""

    source: Path
    out: Path
    text: str = ""              # clone: the text to speak


class _TqdmHandler(logging.Handler):
    """Log records printed above the progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cli", description="Batch clones and edits with the studio's engine and prompt cache.",
        epilog="Any app.py flag (--engine, --model-root, --cache-dir, --device, ...) and STUDIO_* variable "
               "works here too; see python app.py --help.")
    sub = parser.add_subparsers(dest="command", required=True)

    clone = sub.add_parser("clone", help="speak texts in the voice of one or more prompt clips")
    clone.add_argument("--voice", type=Path, action="append", default=[],
                       help="a prompt clip or a folder of them (repeatable)")
    clone.add_argument("--voices", type=Path, action="append", default=[], help="same as --voice")
    clone.add_argument("--voice-text", help="what the prompt clip says (one clip only; default: <clip>.txt or ASR)")
    clone.add_argument("--text", action="append", default=[], help="a text to speak (repeatable)")
    clone.add_argument("--text-file", type=Path, action="append", default=[],
                       help="a UTF-8 file with one text to speak per line (blank lines skipped)")
    clone.add_argument("--instructions", default="", help="edits applied after each clone, e.g. 'whisper, slower'")

    # Handled by cli.production before this parser runs; listed here for --help.
    sub.add_parser("script", help="render a script file with a cast to audio + captions (studio-batch script --help)",
                   add_help=False)
    edit = sub.add_parser("edit", help="edit audio files (or every audio file in folders)")
    edit.add_argument("inputs", type=Path, nargs="+", help="audio files or folders (searched recursively)")
    edit.add_argument("--edit-type", required=True, help="emotion, style, speed, paralinguistic, denoise or vad")
    edit.add_argument("--edit-info", default=None, help="the option, e.g. happy, whisper, faster")
    edit.add_argument("--audio-text", help="what every input says (default: <clip>.txt beside it, else ASR)")
    edit.add_argument("--text", help="paralinguistic: the new text with tags, e.g. 'That was [Laughter] fun'")
    edit.add_argument("--iterations", type=int, default=1, help="apply the edit 1-5 times (stronger)")
    edit.add_argument("--keep-passes", action="store_true", help="also write every pass before the last")

    for command in (clone, edit):
        command.add_argument("--out", type=Path, required=True, help="output folder (created if missing)")
        command.add_argument("--format", default="wav", choices=tuple(_EXTENSIONS), help="output format")
        command.add_argument("--seed", type=int, default=None, help="sampling seed (default: random per job)")
        command.add_argument("--overwrite", action="store_true", help="replace existing output files")
        command.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _audio_files(paths: list[Path]) -> list[Path]:
    """Audio files of ``paths`` (folders searched recursively, sorted), without repeats.

    Raises:
        ValueError: a path does not exist or names no audio.
    """
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
            if not files:
                raise ValueError(f"no audio files ({', '.join(AUDIO_SUFFIXES)}) in {path}")
            found += files
        elif path.is_file():
            found.append(path)
        else:
            raise ValueError(f"no such file or folder: {path}")
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if len(unique) > MAX_JOBS:
        raise ValueError(f"{len(unique)} input files; at most {MAX_JOBS} per run")
    return unique


def _texts(args) -> list[str]:
    texts = [t for t in args.text if t.strip()]
    for path in args.text_file:
        try:
            texts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read the text file {path}: {exc}") from None
    if not texts:
        raise ValueError("nothing to say: give --text or --text-file")
    return texts


def _sidecar(clip: Path) -> str:
    path = clip.with_suffix(".txt")
    try:
        return path.read_text(encoding="utf-8").strip() if path.is_file() else ""
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("ignoring %s: %s", path, exc)
        return ""


def _clone_jobs(args) -> list[Job]:
    clips = _audio_files(args.voice + args.voices)
    if not clips:
        raise ValueError("no voice: give --voice (a prompt clip or a folder of them)")
    if args.voice_text and len(clips) > 1:
        raise ValueError("--voice-text describes one clip, but there are several voices; use <clip>.txt files")
    texts = _texts(args)
    if len(clips) * len(texts) > MAX_JOBS:
        raise ValueError(f"{len(clips)} voices x {len(texts)} texts is over {MAX_JOBS} jobs")
    ext = _EXTENSIONS[args.format]
    return [Job(clip, args.out / f"{clip.stem}_{i:03d}.{ext}", text)
            for clip in clips for i, text in enumerate(texts, start=1)]


def _edit_label(args) -> str:
    label = args.edit_type + (f"-{args.edit_info}" if args.edit_info else "")
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in label)


def _edit_jobs(args) -> list[Job]:
    ext = _EXTENSIONS[args.format]
    return [Job(clip, args.out / f"{clip.stem}.{_edit_label(args)}.{ext}") for clip in _audio_files(args.inputs)]


class Runner:
    """Runs jobs on one engine, writing results and logging one timing line per result."""

    def __init__(self, engine, args) -> None:
        self.engine = engine
        self.args = args
        self.transcripts: dict[Path, str] = {}
        self.audio_seconds = 0.0

    def transcript(self, clip: Path, given: str | None) -> str:
        """``given``, else ``<clip>.txt``, else the engine's ASR (once per clip)."""
        if given and given.strip():
            return given
        if clip not in self.transcripts:
            text = _sidecar(clip)
            if not text:
                transcript = self.engine.transcribe(clip)
                self._log("transcribe", transcript.timings)
                log.info("%s: transcribed as %r", clip.name, transcript.text)
                text = transcript.text
            self.transcripts[clip] = text
        return self.transcripts[clip]

    def clone(self, job: Job, steps) -> None:
        from core.edit_options import tag_warning

        warning = tag_warning(job.text)
        if warning:
            log.warning("%s: %s", job.out.name, warning)
        result = self.engine.clone(job.source, self.transcript(job.source, self.args.voice_text), job.text,
                                   seed=self.args.seed)
        self._log("clone", result.timings)
        audio = result.audio
        for i, step in enumerate(steps):
            edited = self.engine.edit(audio, result.text, step.edit_type, step.edit_info,
                                      seed=(result.seed + 1 + i) % 2**31)
            self._log(f"edit_{step.edit_type}", edited.timings)
            audio = edited.audio
        self._write(job.out, audio)

    def edit(self, job: Job) -> None:
        args = self.args
        needs_text = args.edit_type not in ("denoise", "vad")
        audio_text = self.transcript(job.source, args.audio_text) if needs_text else (args.audio_text or "")
        results = self.engine.edit_iterations(job.source, audio_text, args.edit_type, args.edit_info, args.text,
                                              iterations=args.iterations, seed=args.seed)
        for i, result in enumerate(results, start=1):
            self._log(f"edit_{args.edit_type}", result.timings)
            if args.keep_passes and i < len(results):
                self._write(job.out.with_name(f"{job.out.stem}.pass{i}{job.out.suffix}"), result.audio)
        self._write(job.out, results[-1].audio)

    def _write(self, path: Path, audio) -> None:
        from core.audio_io import encode_audio

        write_atomically(path, encode_audio(audio, self.args.format))
        self.audio_seconds += audio.duration

    @staticmethod
    def _log(kind: str, timings) -> None:
        log.info(timings.log_line(f"cli_{kind}", secrets.token_hex(6)))


def write_atomically(path: Path, data: bytes) -> None:
    """Publish ``data`` at ``path`` whole or not at all, durably (survives kill -9 and power loss)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())   # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)   # the rename itself survives a crash


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def lock_output_folder(folder: Path) -> int:
    """An open descriptor of ``folder`` holding an exclusive lock on it until it is closed (the kernel
    also releases it when the process dies, kill -9 included).

    Raises:
        OSError: another run holds it (``BlockingIOError``) or the folder cannot be opened.
    """
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


def remove_leftovers(folder: Path) -> int:
    """Delete ``.part`` files a killed run left in ``folder`` (call with the folder locked); returns how many."""
    removed = 0
    for path in folder.iterdir():
        if PARTIAL.fullmatch(path.name) and path.is_file():
            try:
                path.unlink()
                removed += 1
            except OSError as exc:   # not ours to remove (permissions): harmless, it is hidden and never read
                log.warning("cannot remove the partial file %s: %s", path, exc)
    return removed


def _configure_logging(level: str) -> None:
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status."""
    from core.settings import load_settings

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["script"]:   # productions: a script with a cast -> audio + captions (cli.production)
        from cli.production import main as script_main

        return script_main(argv[1:])
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    try:
        settings = load_settings(rest)
    except SystemExit:  # an unknown flag: argparse has said which
        return 2
    except ValueError as exc:
        print(f"python -m cli: {exc}", file=sys.stderr)
        return 2
    _configure_logging(settings.log_level)

    from core.errors import StudioError
    from core.instructions import parse_instructions
    from tts_engine.contract import validate_iterations

    try:
        if args.command == "clone":
            steps = parse_instructions(args.instructions)
            jobs = _clone_jobs(args)
        else:
            steps = ()
            validate_iterations(args.iterations)
            jobs = _edit_jobs(args)
        args.out.mkdir(parents=True, exist_ok=True)
        lock = lock_output_folder(args.out)
    except BlockingIOError:
        print(f"python -m cli {args.command}: another run is writing to {args.out}; wait for it or use another "
              "--out folder", file=sys.stderr)
        return 2
    except (ValueError, StudioError, OSError) as exc:
        print(f"python -m cli {args.command}: {exc}", file=sys.stderr)
        return 2
    try:
        return _run(args, settings, steps, jobs)
    finally:
        os.close(lock)


def _run(args, settings, steps, jobs: list[Job]) -> int:
    """Run ``jobs`` with the output folder locked; returns the exit status."""
    from core.errors import StudioError

    leftovers = remove_leftovers(args.out)
    if leftovers:
        log.info("removed %d partial file(s) left by an interrupted run", leftovers)
    if not args.overwrite:
        skipped = [job for job in jobs if job.out.exists()]
        if skipped:
            log.info("%d output file(s) exist already and are skipped (--overwrite replaces them)", len(skipped))
        jobs = [job for job in jobs if not job.out.exists()]

    from core.devices import configure_threads
    from tts_engine.contract import validate_edit
    from tts_engine.select import create_engine

    configure_threads(settings.torch_threads)
    started = time.perf_counter()
    try:
        engine = create_engine(settings)
        for step in steps:
            validate_edit(step.edit_type, step.edit_info, engine.capabilities())
        if args.command == "edit":
            validate_edit(args.edit_type, args.edit_info, engine.capabilities())
    except StudioError as exc:
        log.error("cannot start: %s", exc)
        return 2
    log.info("engine %s ready in %.1f s; %d job(s)", engine.describe().name, time.perf_counter() - started, len(jobs))

    from tqdm import tqdm

    runner = Runner(engine, args)
    failed = 0
    work_started = time.perf_counter()
    try:
        with tqdm(jobs, desc=args.command, unit="file", file=sys.stderr, disable=args.no_progress,
                  dynamic_ncols=True) as bar:
            for job in bar:
                bar.set_postfix_str(job.out.name, refresh=False)
                try:
                    runner.clone(job, steps) if args.command == "clone" else runner.edit(job)
                except (StudioError, OSError) as exc:
                    failed += 1
                    log.error("%s (%s) failed: %s", job.out.name, job.source.name, exc)
    finally:
        engine.close()
    elapsed = time.perf_counter() - work_started
    rtf = elapsed / runner.audio_seconds if runner.audio_seconds > 0 else float("nan")
    log.info("done: %d of %d job(s) written to %s, %d failed; %.1f s for %.1f s of audio (RTF %.3f)",
             len(jobs) - failed, len(jobs), args.out, failed, elapsed, runner.audio_seconds, rtf)
    return 1 if failed else 0
