"""The image's liveness probe: GET /healthz on the address and port the running studio really uses.

Owns: finding the studio process (``python app.py ...``) in /proc, rebuilding its settings from its own
command line and environment with the app's parser (so ``--port`` and ``--host`` flags count, not only
``STUDIO_PORT``), and probing ``/healthz`` there. Exit status 0 healthy, 1 not (Docker's convention).
Does not own: what /healthz reports (web/api.py) or readiness (/readyz).

    python scripts/healthcheck.py              # the Dockerfile's HEALTHCHECK and compose's healthcheck
    python scripts/healthcheck.py --pid 1234   # probe one process (several studios on one machine)

Reads only /proc entries of the current user (a container runs one studio as uid 1000); the first
``app.py`` process found wins, which is the only one in a container.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run as a file: the project's packages

from core.settings import load_settings  # noqa: E402

PROC = Path("/proc")
TIMEOUT_S = 4.0   # below the HEALTHCHECK's 5 s timeout, so a slow answer is a clean failure
# A wildcard bind answers on loopback; probing the wildcard address itself is not portable.
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}


def _app_argv(cmdline: list[str]) -> list[str] | None:
    """The flags after ``app.py`` when ``cmdline`` runs the studio with Python, else None."""
    if not cmdline or "python" not in Path(cmdline[0]).name:
        return None
    for i, arg in enumerate(cmdline[1:], start=1):
        if Path(arg).name == "app.py":
            return cmdline[i + 1:]
        if not arg.startswith("-"):   # another script: not the studio
            return None
    return None


def _read_nul_list(path: Path) -> list[str]:
    return [part for part in path.read_bytes().decode(errors="replace").split("\0") if part]


def studio_process(pid: int | None = None) -> tuple[list[str], dict[str, str]]:
    """(flags, environment) of the studio process ``pid``, or of the first one found.

    Raises:
        LookupError: no readable studio process.
    """
    candidates = [PROC / str(pid)] if pid else sorted((p for p in PROC.iterdir() if p.name.isdigit()),
                                                      key=lambda p: int(p.name))
    for entry in candidates:
        try:
            if entry.stat().st_uid != os.getuid() and os.getuid() != 0:
                continue
            argv = _app_argv(_read_nul_list(entry / "cmdline"))
            if argv is None:
                continue
            env = dict(item.split("=", 1) for item in _read_nul_list(entry / "environ") if "=" in item)
            return argv, env
        except OSError:   # the process ended, or is not ours
            continue
    raise LookupError("no running studio process (python app.py) found" + (f" with pid {pid}" if pid else ""))


def healthz_url(argv: list[str], env: dict[str, str]) -> str:
    settings = load_settings(argv, env=env)
    host = _WILDCARDS.get(settings.host, settings.host)
    return f"http://{f'[{host}]' if ':' in host else host}:{settings.port}/healthz"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Probe the running studio's /healthz.")
    parser.add_argument("--pid", type=int, default=None, help="the studio process (default: the first found)")
    args = parser.parse_args(argv)
    try:
        url = healthz_url(*studio_process(args.pid))
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as answer:   # raises on an HTTP error status
            answer.read()
    except (LookupError, ValueError, OSError) as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
