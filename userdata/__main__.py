"""``python -m userdata``: back up, restore, upgrade and check the user-data database.

    python -m userdata backup FILE      # SQLite: a consistent copy while the studio runs (online backup)
    python -m userdata restore FILE     # SQLite: put FILE's contents back (voices made since are gone)
    python -m userdata upgrade          # bring the schema to this code's version (the studio does it at start)
    python -m userdata check            # list inconsistencies (none expected)

The database is the studio's (``--data-dir`` / ``--database-url`` or their ``STUDIO_*`` variables;
any other studio flag is accepted and ignored). PostgreSQL is backed up with its own tools:
``pg_dump -Fc -f studio.dump "$URL"`` and restored with ``pg_restore --clean --if-exists -d "$URL"
studio.dump`` (docs/scaling.md).
"""

from __future__ import annotations

import argparse
import logging
import sqlite3
import sys
from pathlib import Path

from core.errors import StudioError
from core.settings import load_settings
from userdata.db import BUSY_TIMEOUT_MS, Database, database_url, redact
from userdata.migrations import current_revision, head_revision
from userdata.voices import VoiceStore


def restore_sqlite(source: Path, db: Database) -> None:
    """Replace the database's contents with ``source`` (an SQLite backup), through SQLite's backup
    API so that a running studio's connections see the restored data, never a torn file.

    Raises:
        StudioError: ``source`` is not an intact studio database, or is newer than this code.
    """
    if db.path is None:
        raise StudioError("restore copies SQLite files; restore PostgreSQL with pg_restore (docs/scaling.md)")
    if not source.is_file():
        raise StudioError(f"no backup file {source}")
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    try:
        try:
            if src.execute("PRAGMA integrity_check").fetchone() != ("ok",):
                raise StudioError(f"{source} is damaged (PRAGMA integrity_check failed)")
            revision = src.execute("SELECT version_num FROM alembic_version").fetchone()
        except sqlite3.DatabaseError as exc:
            raise StudioError(f"{source} is not a studio database ({exc})") from None
        if revision is None or revision[0] != head_revision():
            # An older backup is upgraded after the restore; a newer one must not be used by this code.
            from alembic.script import ScriptDirectory

            from userdata.migrations import alembic_config

            known = {r.revision for r in ScriptDirectory.from_config(alembic_config()).walk_revisions()}
            if revision is None or revision[0] not in known:
                raise StudioError(f"{source} has schema revision {revision and revision[0]!r}, unknown to this studio")
        dst = sqlite3.connect(db.path, timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            src.backup(dst)
        finally:
            dst.close()
    finally:
        src.close()
    db.migrate()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m userdata", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("command", choices=("backup", "restore", "upgrade", "check"))
    parser.add_argument("file", nargs="?", type=Path, help="the backup file (backup, restore)")
    args, studio_flags = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings([f for f in studio_flags])
        if args.command in ("backup", "restore") and args.file is None:
            parser.error(f"{args.command} needs a FILE")
        db = Database(database_url(settings))
        if args.command == "backup":
            db.migrate()
            print(f"backed up {redact(db.url)} to {db.backup(args.file)}")
        elif args.command == "restore":
            restore_sqlite(args.file, db)
            print(f"restored {redact(db.url)} from {args.file}")
        elif args.command == "upgrade":
            print(f"{redact(db.url)} is at schema revision {db.migrate()}")
        else:
            db.migrate()
            problems = VoiceStore(db).check()
            with db.read() as conn:
                print(f"{redact(db.url)}: schema {current_revision(conn)}, {len(problems)} problem(s)")
            for problem in problems:
                print("  " + problem)
            return 1 if problems else 0
    except (StudioError, ValueError) as exc:
        print(f"python -m userdata: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
