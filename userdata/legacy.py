"""The one-time move of voices from the old folder store (``<cache_dir>/voices/<id>/``) into the database.

Owns: :func:`import_voice_folders` -- each ``<id>/`` folder with ``voice.json`` and ``audio.wav`` becomes
a stored voice with the same id, name, transcript, creation time and namespaces (plus whatever prompt
entries ``prompts_for`` finds for its clip); the folder is deleted only after the stored voice was
read back and matched (same digest, same transcript), so nothing is lost if the studio stops half way.
Run at every start: it is idempotent (an id already stored with the same clip counts as done), and
it removes the ``.tmp-*`` folders the old store left behind when killed.
Does not own: voices (``userdata.voices``), computing prompt entries (the caller's ``prompts_for``).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from core.audio_io import Audio, load_audio
from core.errors import InputError
from funasr_cache.store import PromptEntry, audio_digest
from userdata.voices import VOICE_ID, VoiceExists, VoiceNotFound, VoiceStore

log = logging.getLogger(__name__)

PromptsFor = Callable[[Audio, str], "tuple[PromptEntry, ...]"]


@dataclass
class LegacyImport:
    """What one run did: ids imported now, ids already in the database, folders left (with why)."""

    imported: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)


def import_voice_folders(store: VoiceStore, root: Path | str, prompts_for: PromptsFor | None = None) -> LegacyImport:
    """Move the voice folders under ``root`` into ``store`` (see the module docstring).

    Raises:
        StoreUnavailable: the database cannot be reached (nothing is deleted; the next start retries).
    """
    root = Path(root)
    report = LegacyImport()
    if not root.is_dir():
        return report
    for leftover in root.glob(".tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
        log.info("removed %s, a half-written voice of the old folder store", leftover.name)
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and VOICE_ID.fullmatch(p.name)):
        try:
            _import_one(store, folder, prompts_for, report)
        except (InputError, OSError, ValueError, TypeError, KeyError) as exc:   # this folder only
            report.kept[folder.name] = str(exc)
            log.warning("voice folder %s was not imported and is kept: %s", folder, exc)
    if report.imported or report.already:
        log.info("voice folders imported into the database: %d now, %d before; %d kept (%s)", len(report.imported),
                 len(report.already), len(report.kept), ", ".join(sorted(report.kept)) or "none")
    try:
        root.rmdir()   # only when empty
    except OSError:
        pass
    return report


def _import_one(store: VoiceStore, folder: Path, prompts_for: PromptsFor | None, report: LegacyImport) -> None:
    meta = json.loads((folder / "voice.json").read_text())
    audio = load_audio(folder / "audio.wav", what=f"voice folder {folder.name}'s audio")
    digest = audio_digest(audio.samples, audio.sample_rate)
    if meta.get("digest") not in (None, digest):
        raise InputError(f"its audio does not match the digest in voice.json ({digest[:12]} != {meta['digest'][:12]})")
    transcript = meta["transcript"]
    try:
        store.create(audio, transcript, str(meta.get("name") or ""), dict(meta.get("namespaces") or {}),
                     voice_id=folder.name, prompts=prompts_for(audio, digest) if prompts_for else (),
                     created_at=float(meta.get("created_at") or folder.stat().st_mtime))
        report.imported.append(folder.name)
    except VoiceExists:
        report.already.append(folder.name)
    try:
        stored, back = store.get(folder.name), store.audio(folder.name)
    except VoiceNotFound as exc:
        raise InputError(f"it could not be read back after the import ({exc})") from None
    if stored.digest != digest or stored.transcript != transcript \
            or audio_digest(back.samples, back.sample_rate) != digest:
        raise InputError(f"the database holds a different voice with id {folder.name!r}")
    shutil.rmtree(folder)
    log.info("voice %s imported from %s and verified; folder removed", folder.name, folder)
