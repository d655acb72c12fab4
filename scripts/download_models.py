"""Download the Step-Audio-EditX model folders into the model root, and check them.

Owns: fetching ``stepfun-ai/Step-Audio-Tokenizer`` and ``stepfun-ai/Step-Audio-EditX`` (Hugging Face
``snapshot_download``, or the ModelScope equivalent) into ``<model_root>/<name>/``, and the integrity
check of what is on disk: every file the engine needs is present and non-empty, sizes known in advance
match, every file the hub lists has the hub's size, and the key weight files have the hub's SHA-256.
Does not own: which files the engine needs (``engine.select.REQUIRED_*``), where the model root is
(``core/settings.py``: ``--model-root`` / ``STUDIO_MODEL_ROOT``), or loading the models.

Usage::

    python scripts/download_models.py                  # download (resumes) + check
    python scripts/download_models.py --check-only     # check what is on disk (+ hub sizes when online)
    python scripts/download_models.py --dry-run        # say what would happen; no network, no writes
    docker compose --profile tools run --rm download   # the same inside the image

Exit status: 0 all good; 1 the check found problems (each printed); 2 could not run (offline mode,
hub unreachable, bad arguments).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

ROOT = Path(__file__).resolve().parent.parent

from core.settings import EDITX_DIRNAME, FUNASR_SUBDIR, TOKENIZER_DIRNAME, load_settings

log = logging.getLogger("download_models")

_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class ModelRepo:
    """One hub repository and the folder it becomes under the model root."""

    repo_id: str                                  # same id on Hugging Face and ModelScope
    dirname: str                                  # folder under model_root
    key_files: tuple[str, ...]                    # relative paths the engine needs; "a|b" = either
    known_sizes: Mapping[str, int] = field(default_factory=dict)  # bytes, when known without the hub


def default_repos() -> tuple[ModelRepo, ...]:
    """The two repositories, with the engine's own list of required files."""
    from core.settings import DECODER_SUBDIR
    from engine.select import REQUIRED_DECODER_FILES, REQUIRED_EDITX_FILES, REQUIRED_FUNASR_FILES, REQUIRED_TOKENIZER_FILES

    def under(folder: str, names: Iterable[str]) -> tuple[str, ...]:
        return tuple("|".join(f"{folder}/{option}" for option in name.split("|")) for name in names)

    tokenizer = ModelRepo(
        "stepfun-ai/Step-Audio-Tokenizer", TOKENIZER_DIRNAME,
        tuple(REQUIRED_TOKENIZER_FILES) + under(FUNASR_SUBDIR, REQUIRED_FUNASR_FILES),
        # Size of the S3 tokenizer as published (docs/reference: pipeline.md section 2.1).
        {"speech_tokenizer_v1.onnx": 522_625_011})
    editx = ModelRepo(
        "stepfun-ai/Step-Audio-EditX", EDITX_DIRNAME,
        tuple(REQUIRED_EDITX_FILES) + under(DECODER_SUBDIR, REQUIRED_DECODER_FILES))
    return tokenizer, editx


@dataclass(frozen=True)
class RemoteFile:
    """A file as the hub describes it."""

    path: str                 # relative to the repository root, "/"-separated
    size: int | None          # bytes
    sha256: str | None        # hex; the hub only has it for LFS files (the weights)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a model folder."""

    path: str                 # relative to the model root
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


# ------------------------------------------------------------------------------------------ hub metadata

def remote_files_from_siblings(siblings: Iterable) -> dict[str, RemoteFile]:
    """``{path: RemoteFile}`` from ``HfApi().model_info(..., files_metadata=True).siblings``."""
    files = {}
    for sibling in siblings:
        lfs = getattr(sibling, "lfs", None)
        sha = (lfs.get("sha256") if isinstance(lfs, Mapping) else getattr(lfs, "sha256", None)) if lfs else None
        files[sibling.rfilename] = RemoteFile(sibling.rfilename, sibling.size, sha)
    return files


def fetch_hub_metadata(repo_id: str, revision: str | None) -> dict[str, RemoteFile]:
    """File sizes and LFS checksums of a Hugging Face repository (network).

    Raises:
        OSError: the hub could not be reached or answered with an error (message says which).
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    except (HfHubHTTPError, OSError, ValueError) as exc:  # requests' errors are OSErrors
        raise OSError(f"could not read the file list of {repo_id} from the hub: {exc}") from None
    return remote_files_from_siblings(info.siblings or ())


# ------------------------------------------------------------------------------------------ checking

def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 8 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def check_folder(model_root: Path, repo: ModelRepo, remote: Mapping[str, RemoteFile] | None = None,
                 hash_all: bool = False) -> list[Problem]:
    """Everything wrong with ``model_root/repo.dirname`` (an empty list when it is complete).

    Parameters:
        remote: the hub's file list; when given, every file on it must exist locally with the hub's
            size, and the key files (all LFS files with ``hash_all``) must have the hub's SHA-256.
            Without it only the key files are checked: present, non-empty, known sizes.
    """
    folder = model_root / repo.dirname
    problems: list[Problem] = []

    def rel(name: str) -> str:
        return f"{repo.dirname}/{name}"

    key_present: set[str] = set()
    for name in repo.key_files:
        options = name.split("|")
        found = next((option for option in options if (folder / option).is_file()), None)
        if found is None:
            problems.append(Problem(rel(options[0]), "missing" + "".join(f" (or {Path(o).name})" for o in options[1:])))
            continue
        key_present.add(found)
        size = (folder / found).stat().st_size
        expected, origin = repo.known_sizes.get(found), ""
        if remote is not None and found in remote and remote[found].size is not None:
            expected, origin = remote[found].size, " (hub)"  # the hub is the authority when it can be asked
        if size == 0:
            problems.append(Problem(rel(found), "empty file (an interrupted download?)"))
        elif expected is not None and size != expected:
            problems.append(Problem(rel(found), f"{size:,} bytes, expected {expected:,}{origin}"))

    for path, info in sorted((remote or {}).items()):
        local = folder / path
        if not local.is_file():
            if path not in key_present and not any(p.path == rel(path) for p in problems):
                problems.append(Problem(rel(path), "missing (listed on the hub)"))
            continue
        size = local.stat().st_size
        if info.size is not None and size != info.size:
            if not any(p.path == rel(path) for p in problems):
                problems.append(Problem(rel(path), f"{size:,} bytes, expected {info.size:,} (hub)"))
            continue
        if info.sha256 and (hash_all or path in key_present):
            actual = sha256_file(local)
            if actual != info.sha256:
                problems.append(Problem(rel(path), f"SHA-256 {actual[:16]}... differs from the hub's {info.sha256[:16]}..."))
    return problems


# ------------------------------------------------------------------------------------------ download

def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def download(repo: ModelRepo, model_root: Path, source: str, revision: str | None) -> None:
    """Fetch (or resume) one repository into ``model_root/repo.dirname``.

    Raises:
        OSError: the hub could not be reached or refused the download.
    """
    target = model_root / repo.dirname
    target.mkdir(parents=True, exist_ok=True)
    try:
        if source == "modelscope":
            from modelscope import snapshot_download as ms_snapshot_download

            kwargs = {"revision": revision} if revision else {}
            ms_snapshot_download(model_id=repo.repo_id, local_dir=str(target), **kwargs)
        else:
            from huggingface_hub import snapshot_download
            from huggingface_hub.errors import HfHubHTTPError

            try:
                snapshot_download(repo.repo_id, revision=revision, local_dir=target)
            except HfHubHTTPError as exc:
                raise OSError(str(exc)) from None
    except (OSError, ValueError) as exc:
        raise OSError(f"downloading {repo.repo_id} from {source} failed: {exc}") from None


# ------------------------------------------------------------------------------------------ CLI

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Download and check the Step-Audio-EditX model folders.")
    parser.add_argument("--model-root", type=Path, default=None,
                        help="where the folders go (default: --model-root of the studio, i.e. STUDIO_MODEL_ROOT or ./models)")
    parser.add_argument("--source", choices=("huggingface", "modelscope"), default="huggingface",
                        help="hub to download from (hub size/checksum checks need huggingface)")
    parser.add_argument("--revision", default=None, help="branch, tag or commit to download (default: the hub's default)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the plan and the offline check; no network, no writes")
    mode.add_argument("--check-only", action="store_true", help="check the folders on disk; do not download")
    parser.add_argument("--offline", action="store_true", help="with --check-only: do not ask the hub for sizes and checksums")
    parser.add_argument("--hash-all", action="store_true", help="verify the SHA-256 of every weight file, not just the key files")
    return parser


def _report(problems: Sequence[Problem]) -> None:
    for problem in problems:
        print(f"  PROBLEM {problem}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    model_root = args.model_root or load_settings([], os.environ).model_root
    repos = default_repos()

    if args.dry_run:
        print(f"dry run: would download into {model_root.resolve()} from {args.source}"
              f" (revision {args.revision or 'default'}); nothing is fetched or written")
        for repo in repos:
            problems = check_folder(model_root, repo)
            state = "complete" if not problems else f"{len(problems)} problem(s) now"
            print(f"- {repo.repo_id} -> {model_root / repo.dirname} ({state})")
            for name in repo.key_files:
                size = repo.known_sizes.get(name.split("|")[0])
                first, *others = name.split("|")
                print(f"    key file {first}" + "".join(f" (or {Path(o).name})" for o in others)
                      + (f" ({size:,} bytes)" if size else ""))
        return 0

    use_hub = args.source == "huggingface" and not args.offline
    if not args.check_only and _offline():
        print("error: HF_HUB_OFFLINE is set, so nothing can be downloaded; run with HF_HUB_OFFLINE=0 "
              "(the compose 'download' service does), or use --check-only", file=sys.stderr)
        return 2
    if use_hub and _offline():
        print("note: HF_HUB_OFFLINE is set: checking presence and known sizes only")
        use_hub = False

    all_problems: list[Problem] = []
    for repo in repos:
        try:
            if not args.check_only:
                print(f"downloading {repo.repo_id} into {model_root / repo.dirname} ...")
                download(repo, model_root, args.source, args.revision)
            remote = None
            if use_hub:
                try:
                    remote = fetch_hub_metadata(repo.repo_id, args.revision)
                except OSError as exc:
                    if not args.check_only:
                        raise
                    print(f"note: {exc}; checking presence and known sizes only")
        except OSError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        problems = check_folder(model_root, repo, remote, hash_all=args.hash_all)
        checked = "hub sizes and checksums" if remote is not None else "presence and known sizes"
        print(f"{repo.repo_id}: {'OK' if not problems else 'INCOMPLETE'} ({checked})")
        _report(problems)
        all_problems.extend(problems)
    if all_problems:
        print(f"{len(all_problems)} problem(s); run without --check-only to download the missing parts", file=sys.stderr)
        return 1
    print(f"model folders under {model_root} are complete")
    return 0


if __name__ == "__main__":
    sys.exit(main())
