"""Gradio's upload folder, bounded: a byte and file-count quota and an age limit.

Owns: :func:`sweep`, which deletes files of the folder older than the age limit and then the oldest
ones until the folder fits the quota; and :class:`UploadQuota`, ASGI middleware that runs a sweep (in a
worker thread) after every upload Gradio accepted (``POST .../gradio_api/upload`` answered 200). The
settings keep the quota at least one upload (``upload_folder_max_bytes >= max_upload_bytes``), so the
newest upload itself always fits.
Does not own: where the folder is (Gradio's ``GRADIO_TEMP_DIR``, default ``<tmp>/gradio``), the size
of one request (``web.guards.BodyLimit``), Gradio's own scheduled age clean-up (``delete_cache`` in
``web.ui``, which this complements: Gradio's alone keeps files a whole age with no quota).

Oldest-first eviction means a flood of uploads can push out a file another user uploaded moments
earlier (that user's next step then fails and they upload again); the alternative, refusing uploads
while the folder is full, would let the same flood lock every user out for the whole age limit. Files
Gradio keeps on purpose (``protected``: examples) are never deleted. Results the page writes there
between uploads are bounded by the age limit only (Gradio's clean-up) until the next upload's sweep.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import anyio

log = logging.getLogger(__name__)

EMPTY_DIR_GRACE_S = 60.0   # Gradio makes a folder, then writes the file into it: leave young empty ones


@dataclass(frozen=True)
class Sweep:
    """What one sweep did and what the folder holds after it."""

    removed_files: int
    removed_bytes: int
    files: int
    bytes: int


def _files(root: Path) -> list[tuple[float, int, str]]:
    """(mtime, size, path) of every regular file under ``root`` (symlinks are not followed)."""
    found, stack = [], [str(root)]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:   # gone meanwhile, or unreadable
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    info = entry.stat(follow_symlinks=False)
                    found.append((info.st_mtime, info.st_size, entry.path))
            except OSError:
                continue
    return found


def _remove_empty_dirs(root: Path, now: float) -> None:
    for folder, subdirs, files in os.walk(root, topdown=False):
        if Path(folder) == root or subdirs or files:
            continue
        try:
            if now - os.stat(folder).st_mtime > EMPTY_DIR_GRACE_S:
                os.rmdir(folder)
        except OSError:   # refilled or removed meanwhile
            pass


def sweep(root: Path, max_bytes: int, max_files: int, max_age_s: float, protected: frozenset[str] = frozenset(),
          now: float | None = None) -> Sweep:
    """Delete files older than ``max_age_s``, then the oldest until ``root`` fits the quota (``protected``
    files are neither deleted nor counted)."""
    now = time.time() if now is None else now
    files = sorted(f for f in _files(root) if f[2] not in protected)   # oldest first; kept files do not count
    keep_bytes = sum(size for _, size, _ in files)
    keep_files = len(files)
    removed_files = removed_bytes = 0
    for mtime, size, path in files:
        expired = now - mtime > max_age_s
        over = keep_bytes > max_bytes or keep_files > max_files
        if not (expired or over):
            break   # younger files follow: neither expired nor needed for the quota
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot delete the upload %s: %s", path, exc)
            continue
        keep_bytes -= size
        keep_files -= 1
        removed_files += 1
        removed_bytes += size
    if removed_files:
        _remove_empty_dirs(root, now)
    return Sweep(removed_files, removed_bytes, keep_files, keep_bytes)


class UploadQuota:
    """Keep the upload folder within its quota and age limit after each Gradio upload (ASGI middleware)."""

    def __init__(self, app, folder: str | Path, max_bytes: int, max_files: int, max_age_s: float,
                 protected: Callable[[], frozenset[str]] = frozenset) -> None:
        self.app = app
        self.folder = Path(folder)
        self.max_bytes, self.max_files, self.max_age_s = max_bytes, max_files, max_age_s
        self.protected = protected
        self.lock = anyio.Lock()   # one sweep at a time; concurrent uploads wait for it (it is quick)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].endswith("/gradio_api/upload"):
            return await self.app(scope, receive, send)
        status = 0

        async def watch(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif status == 200 and message["type"] == "http.response.body" and not message.get("more_body"):
                # Before the answer's last byte: once a client has its answer, the folder is within quota.
                # Only for an upload Gradio accepted (logged in, same site): a refused request must not
                # make anyone's files go. The folder exceeds the quota by at most the uploads in flight.
                await self._sweep()
            await send(message)

        await self.app(scope, receive, watch)

    async def _sweep(self) -> None:
        async with self.lock:
            done = await anyio.to_thread.run_sync(
                lambda: sweep(self.folder, self.max_bytes, self.max_files, self.max_age_s, self.protected()))
        if done.removed_files:
            log.info("upload folder: deleted %d file(s), %d bytes (age or quota); %d file(s), %d bytes kept",
                     done.removed_files, done.removed_bytes, done.files, done.bytes)


def keep_example_copies(demo) -> None:
    """Mark the files the page copied into the folder while it was built (its examples) as kept, for
    Gradio's age clean-up and for the quota: without them the example buttons break until a restart."""
    for block in demo.blocks.values():
        keep = getattr(block, "keep_in_cache", None)
        if isinstance(keep, set):
            keep.update(getattr(block, "temp_files", ()))


def kept_files(demo) -> frozenset[str]:
    """Files Gradio keeps in its folder on purpose (``keep_in_cache`` of every component)."""
    return frozenset().union(*(getattr(block, "keep_in_cache", ()) for block in demo.blocks.values()))
