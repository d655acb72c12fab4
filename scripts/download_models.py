"""Download the Step-Audio-EditX model folders into the model root, and check them.

Owns: fetching ``stepfun-ai/Step-Audio-Tokenizer`` and ``stepfun-ai/Step-Audio-EditX`` (and, with
``--awq``, ``stepfun-ai/Step-Audio-EditX-AWQ-4bit`` for the vLLM backend) at a pinned commit (Hugging
Face ``snapshot_download``, or the ModelScope equivalent) into ``<model_root>/<name>/``, and the
integrity check of what is on disk: every file the engine needs is present and non-empty, sizes known
in advance match, every file matches the SHA-256 manifest written at download time
(``<folder>/.studio-manifest.json``: commit + size + SHA-256 of every file), and files whose hashes
upstream publishes match those (``scripts/model_hashes.json``, shipped with this repository). The
hub's own listing (sizes, LFS checksums) is an extra completeness check, never the trust anchor.

Pins: a full commit per repository from ``model_hashes.json``; where none is publicly known (null),
the first download resolves the branch to a commit once, downloads exactly that commit and records it
in the manifest, and later runs (resumes) stay on it. ``--revision`` overrides (``REPO=COMMIT`` for
one repository, or a bare value for all).
Does not own: which files the engine needs (``tts_engine.select.REQUIRED_*``), where the model root is
(``core/settings.py``: ``--model-root`` / ``STUDIO_MODEL_ROOT``), or loading the models.

Usage::

    python scripts/download_models.py                  # download (resumes) + check
    python scripts/download_models.py --check-only     # check what is on disk (+ hub sizes when online)
    python scripts/download_models.py --dry-run        # say what would happen; no network, no writes
    python scripts/download_models.py --awq            # also the AWQ 4-bit LLM (vLLM backend)
    python scripts/download_models.py --write-manifest # trust what is on disk now (folders from before)
    docker compose --profile tools run --rm download   # the same inside the image

Exit status: 0 all good; 1 the check found problems (each printed); 2 could not run (offline mode,
hub unreachable, bad arguments).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

ROOT = Path(__file__).resolve().parent.parent

from core.settings import EDITX_DIRNAME, FUNASR_SUBDIR, TOKENIZER_DIRNAME, load_settings

log = logging.getLogger("download_models")

MANIFEST = ".studio-manifest.json"
AWQ_REPO, AWQ_DIRNAME = "stepfun-ai/Step-Audio-EditX-AWQ-4bit", "Step-Audio-EditX-AWQ-4bit"
HASHES_FILE = Path(__file__).resolve().parent / "model_hashes.json"
_SKIP_DIRS = (".cache",)   # huggingface_hub's download bookkeeping inside local_dir


@dataclass(frozen=True)
class ModelRepo:
    """One hub repository and the folder it becomes under the model root."""

    repo_id: str                                  # same id on Hugging Face and ModelScope
    dirname: str                                  # folder under model_root
    key_files: tuple[str, ...]                    # relative paths the engine needs; "a|b" = either
    known_sizes: Mapping[str, int] = field(default_factory=dict)  # bytes, when known without the hub
    commit: str | None = None                     # pinned commit (None: pinned at first download)
    upstream_sha256: Mapping[str, str] = field(default_factory=dict)  # path -> hex, published upstream


def upstream_facts(repo_id: str) -> tuple[str | None, dict[str, str]]:
    """(pinned commit or None, {path: sha256}) for ``repo_id`` from ``model_hashes.json``."""
    entry = json.loads(HASHES_FILE.read_text()).get(repo_id) or {}
    return entry.get("commit"), dict(entry.get("sha256") or {})


def awq_repo() -> ModelRepo:
    commit, hashes = upstream_facts(AWQ_REPO)
    return ModelRepo(AWQ_REPO, AWQ_DIRNAME, ("config.json",), commit=commit, upstream_sha256=hashes)


def default_repos() -> tuple[ModelRepo, ...]:
    """The two repositories, with the engine's own list of required files."""
    from core.settings import DECODER_SUBDIR
    from tts_engine.select import REQUIRED_DECODER_FILES, REQUIRED_EDITX_FILES, REQUIRED_FUNASR_FILES, REQUIRED_TOKENIZER_FILES

    def under(folder: str, names: Iterable[str]) -> tuple[str, ...]:
        return tuple("|".join(f"{folder}/{option}" for option in name.split("|")) for name in names)

    tok_commit, tok_hashes = upstream_facts("stepfun-ai/Step-Audio-Tokenizer")
    editx_commit, editx_hashes = upstream_facts("stepfun-ai/Step-Audio-EditX")
    tokenizer = ModelRepo(
        "stepfun-ai/Step-Audio-Tokenizer", TOKENIZER_DIRNAME,
        tuple(REQUIRED_TOKENIZER_FILES) + under(FUNASR_SUBDIR, REQUIRED_FUNASR_FILES),
        # Size of the S3 tokenizer as published (docs/reference: pipeline.md section 2.1).
        {"speech_tokenizer_v1.onnx": 522_625_011}, commit=tok_commit, upstream_sha256=tok_hashes)
    editx = ModelRepo(
        "stepfun-ai/Step-Audio-EditX", EDITX_DIRNAME,
        tuple(REQUIRED_EDITX_FILES) + under(DECODER_SUBDIR, REQUIRED_DECODER_FILES),
        commit=editx_commit, upstream_sha256=editx_hashes)
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
    from huggingface_hub.errors import HTTPError

    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    # HTTPError: the hub client's transport errors (connection refused, timeouts; since huggingface_hub
    # 1.0 they are httpx's, not OSErrors), HfHubHTTPError (an error answer) included.
    except (HTTPError, OSError, ValueError) as exc:
        raise OSError(f"could not read the file list of {repo_id} from the hub: {exc}") from None
    return remote_files_from_siblings(info.siblings or ())


# ------------------------------------------------------------------------------------------ checking

def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file (``hashlib.file_digest`` reads it in blocks)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


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


# ------------------------------------------------------------------------------------------ manifest

def local_files(folder: Path) -> list[str]:
    """Every file under ``folder`` ("/"-separated, sorted), without the manifest and hub bookkeeping."""
    out = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if path.is_file() and rel.as_posix() != MANIFEST and rel.parts[0] not in _SKIP_DIRS:
            out.append(rel.as_posix())
    return sorted(out)


def read_manifest(folder: Path) -> dict | None:
    try:
        doc = json.loads((folder / MANIFEST).read_text())
        return doc if isinstance(doc, dict) and isinstance(doc.get("files"), dict) else None
    except (OSError, ValueError):
        return None


def write_manifest(folder: Path, repo: ModelRepo, commit: str | None) -> dict:
    """Record the SHA-256 and size of every file in ``folder`` (and the commit) in its manifest."""
    files = {}
    for rel in local_files(folder):
        files[rel] = {"size": (folder / rel).stat().st_size, "sha256": sha256_file(folder / rel)}
    doc = {"repo_id": repo.repo_id, "commit": commit, "files": files,
           "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True))
    os.replace(tmp, folder / MANIFEST)
    return doc


def verify_hashes(model_root: Path, repo: ModelRepo) -> tuple[list[Problem], bool]:
    """(problems, whether a manifest was there): every file against the manifest (missing, changed,
    added), and the files upstream publishes hashes for against those."""
    folder = model_root / repo.dirname
    problems: list[Problem] = []
    actual: dict[str, str] = {}

    def digest(rel: str) -> str:
        if rel not in actual:
            actual[rel] = sha256_file(folder / rel)
        return actual[rel]

    manifest = read_manifest(folder)
    if manifest is not None:
        recorded = manifest["files"]
        present = set(local_files(folder))
        for rel, info in sorted(recorded.items()):
            if rel not in present:
                problems.append(Problem(f"{repo.dirname}/{rel}", "missing (listed in the manifest)"))
            elif (folder / rel).stat().st_size != info.get("size") or digest(rel) != info.get("sha256"):
                problems.append(Problem(f"{repo.dirname}/{rel}", "changed since download (SHA-256 differs from the manifest)"))
        for rel in sorted(present - set(recorded)):
            problems.append(Problem(f"{repo.dirname}/{rel}", "not in the manifest (added after download)"))
    for rel, expected in sorted(repo.upstream_sha256.items()):
        if (folder / rel).is_file() and digest(rel) != expected:
            problems.append(Problem(f"{repo.dirname}/{rel}",
                                    f"SHA-256 {digest(rel)[:16]}... differs from upstream's {expected[:16]}..."))
    return problems, manifest is not None


def resolve_commit(repo: ModelRepo, model_root: Path, override: str | None) -> str | None:
    """The commit to download: the override, else the pin, else the one the manifest recorded,
    else the hub's current commit of the default branch (looked up once, then recorded)."""
    if override:
        return override
    if repo.commit:
        return repo.commit
    manifest = read_manifest(model_root / repo.dirname)
    if manifest and manifest.get("commit"):
        return manifest["commit"]
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HTTPError

    try:
        sha = HfApi().model_info(repo.repo_id).sha
    except (HTTPError, OSError, ValueError) as exc:   # HTTPError: see fetch_hub_metadata
        raise OSError(f"could not resolve the current commit of {repo.repo_id}: {exc}") from None
    print(f"note: {repo.repo_id} has no published pin; pinning the hub's current commit {sha} (recorded in "
          f"{repo.dirname}/{MANIFEST})")
    return sha


def _overrides(values: Sequence[str], repos: Sequence[ModelRepo]) -> dict[str, str]:
    out = {}
    for value in values:
        name, sep, rev = value.rpartition("=")
        if not sep:
            out.update({repo.repo_id: value for repo in repos})
        else:
            out[name] = rev
    return out


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
    parser.add_argument("--revision", action="append", default=[], metavar="[REPO=]COMMIT",
                        help="commit to download instead of the pin (REPO=COMMIT for one repository; repeatable)")
    parser.add_argument("--awq", action="store_true", help=f"also {AWQ_REPO} (AWQ 4-bit LLM for the vLLM backend)")
    parser.add_argument("--write-manifest", action="store_true",
                        help="record the SHA-256 of what is on disk now as the manifest (trust on first use); no download")
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
    repos = default_repos() + ((awq_repo(),) if args.awq else ())
    overrides = _overrides(args.revision, repos)

    if args.write_manifest:
        for repo in repos:
            folder = model_root / repo.dirname
            if not folder.is_dir():
                print(f"{repo.repo_id}: {folder} does not exist; nothing recorded")
                continue
            old = read_manifest(folder)
            doc = write_manifest(folder, repo, overrides.get(repo.repo_id) or (old or {}).get("commit") or repo.commit)
            print(f"{repo.repo_id}: manifest of {len(doc['files'])} file(s) written to {folder / MANIFEST}")
        return 0

    if args.dry_run:
        print(f"dry run: would download into {model_root.resolve()} from {args.source}; nothing is fetched or written")
        for repo in repos:
            problems = check_folder(model_root, repo)
            state = "complete" if not problems else f"{len(problems)} problem(s) now"
            pin = overrides.get(repo.repo_id) or repo.commit or "pinned at first download"
            print(f"- {repo.repo_id} @ {pin} -> {model_root / repo.dirname} ({state})")
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
        commit = overrides.get(repo.repo_id) or repo.commit
        try:
            if not args.check_only:
                commit = resolve_commit(repo, model_root, overrides.get(repo.repo_id))
                print(f"downloading {repo.repo_id} @ {commit} into {model_root / repo.dirname} ...")
                download(repo, model_root, args.source, commit)
                problems, _ = verify_hashes(model_root, repo)   # upstream hashes, before trusting the files
                if not any("upstream" in p.message for p in problems):
                    write_manifest(model_root / repo.dirname, repo, commit)
            remote = None
            if use_hub:
                try:
                    remote = fetch_hub_metadata(repo.repo_id, commit)
                except OSError as exc:
                    if not args.check_only:
                        raise
                    print(f"note: {exc}; checking presence and known sizes only")
        except OSError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        problems = check_folder(model_root, repo, remote, hash_all=args.hash_all)
        hash_problems, had_manifest = verify_hashes(model_root, repo) if (model_root / repo.dirname).is_dir() \
            else ([], False)
        problems += [p for p in hash_problems if p.path not in {q.path for q in problems}]
        checked = "hub sizes and checksums" if remote is not None else "presence and known sizes"
        checked += ", manifest SHA-256" if had_manifest else ", no manifest (run --write-manifest to record one)"
        checked += ", upstream SHA-256" if repo.upstream_sha256 else ""
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
