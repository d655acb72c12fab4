"""Test helper: a throwaway PostgreSQL server (``initdb`` + ``pg_ctl`` in a temp folder) on 127.0.0.1.

Used by the store tests, the two-host end-to-end test and ``bench/store_bench.py`` when Debian's
``postgresql`` package is installed (``scripts/install.sh --test`` installs it); :func:`pg_binaries`
is None otherwise and callers skip. ``initdb`` refuses to run as root, so as root the cluster is
made and run by the ``postgres`` system user (the package creates it); its folder is handed to
that user. Authentication is ``trust`` on the loopback address only; the server is stopped with
``pg_ctl stop -m immediate`` and its folder deleted.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from testkit.studio_server import free_port


def pg_binaries() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl``, or None when PostgreSQL is not installed."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), reverse=True)
    return candidates[0].parent if candidates else None


def _as_user() -> list[str]:
    """The command prefix that runs PostgreSQL's tools as a non-root user."""
    if os.geteuid() != 0:
        return []
    pwd.getpwnam("postgres")   # KeyError: no postgres user to run as
    return ["runuser", "-u", "postgres", "--"]


@dataclass
class PostgresServer:
    """A running throwaway cluster; ``url`` reaches its ``studio`` database as the ``studio`` role."""

    root: Path
    port: int
    bindir: Path

    @property
    def url(self) -> str:
        return f"postgresql://studio@127.0.0.1:{self.port}/studio"

    def _ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([*_as_user(), str(self.bindir / "pg_ctl"), "-D", str(self.root / "db"), *args],
                              check=check, capture_output=True, text=True, timeout=60)

    def stop(self, mode: str = "fast") -> None:
        self._ctl("stop", "-m", mode, "-w", check=False)

    def start(self) -> None:
        self._ctl("start", "-w", "-l", str(self.root / "server.log"),
                  "-o", f"-c listen_addresses=127.0.0.1 -c port={self.port} -k {self.root} -c fsync=off")

    def psql(self, sql: str, database: str = "postgres") -> str:
        out = subprocess.run([*_as_user(), str(self.bindir / "psql"), "-h", "127.0.0.1", "-p", str(self.port),
                              "-U", "postgres", "-d", database, "-v", "ON_ERROR_STOP=1", "-Atc", sql],
                             check=True, capture_output=True, text=True, timeout=60)
        return out.stdout

    def close(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def start_postgres(parent: Path | str | None = None) -> PostgresServer:
    """initdb + start a cluster under a fresh temp folder; with a ``studio`` role owning a ``studio``
    database.

    Raises:
        RuntimeError: PostgreSQL is not installed or did not start (the message has its log).
    """
    bindir = pg_binaries()
    if bindir is None:
        raise RuntimeError("PostgreSQL is not installed (scripts/install.sh --test installs Debian's postgresql)")
    root = Path(tempfile.mkdtemp(prefix="studio-pg-", dir=parent))
    prefix = _as_user()
    if prefix:
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
        # The postgres user must be able to reach the folder through its parents.
        for parent_dir in list(root.parents)[:-1]:
            if not os.stat(parent_dir).st_mode & 0o001:
                os.chmod(parent_dir, os.stat(parent_dir).st_mode | 0o001)
    subprocess.run([*prefix, str(bindir / "initdb"), "-D", str(root / "db"), "-U", "postgres", "-A", "trust",
                    "-E", "UTF8", "--no-locale", "--no-sync"], check=True, capture_output=True, text=True,
                   timeout=120)
    server = PostgresServer(root, free_port(), bindir)
    try:
        server.start()
        for _ in range(50):
            try:
                server.psql("CREATE ROLE studio LOGIN")
                break
            except subprocess.CalledProcessError:
                time.sleep(0.1)
        server.psql("CREATE DATABASE studio OWNER studio")
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        log = (root / "server.log").read_text(errors="replace") if (root / "server.log").exists() else ""
        server.close()
        raise RuntimeError(f"PostgreSQL did not start: {exc}\n{getattr(exc, 'stderr', '')}\n{log[-2000:]}") from None
    return server
