"""Schema versions of the user-data database (Alembic), applied at start.

Owns: :func:`upgrade` -- bring a database to this code's head revision, once even when several
processes start together (a file lock beside an SQLite file, a PostgreSQL advisory lock), and refuse
a database whose revision this code does not know (a newer studio upgraded it: :class:`SchemaTooNew`).
The revisions live in ``versions/``; ``env.py`` runs them on the connection handed over here.
Does not own: the engine or its connection settings (``userdata.db``), the tables' Python mirror
(``userdata.schema``).

Adding a revision: a new file in ``versions/`` whose ``down_revision`` is the current head (e.g.
``0002_productions`` on ``0001_voices``); there is one linear history, no branches.
"""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from filelock import FileLock
from sqlalchemy import text

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
VERSION_TABLE = "alembic_version"


def alembic_config(connection=None) -> Config:
    """An Alembic ``Config`` for these migrations (no alembic.ini needed); ``connection`` is
    handed to ``env.py``."""
    config = Config()
    config.set_main_option("script_location", str(HERE))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(conn) -> str | None:
    return MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()


def upgrade(db) -> str:
    """Upgrade ``db`` (a :class:`userdata.db.Database`) to the head revision; returns it.

    Raises:
        SchemaTooNew: the database is at a revision this code does not know.
    """
    if db.dialect == "sqlite" and db.path is not None:
        with FileLock(str(db.path) + ".migrate.lock", timeout=120):
            return _upgrade(db)
    return _upgrade(db)


def _upgrade(db) -> str:
    from userdata.db import SchemaTooNew

    script = ScriptDirectory.from_config(alembic_config())
    head = script.get_current_head()
    with db.engine.connect() as conn:
        if db.dialect == "postgresql":
            # Session-level: held across Alembic's own transaction, released when we disconnect.
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _lock_key()})
            conn.commit()
        try:
            current = current_revision(conn)
            conn.rollback()
            if current is not None:
                try:
                    script.get_revision(current)
                except CommandError:
                    raise SchemaTooNew(
                        f"the user-data database is at schema revision {current!r}, which this studio does not "
                        f"know (its newest is {head!r}): a newer studio version upgraded it. Run that version, "
                        "or restore a backup made before the upgrade.") from None
            if current != head:
                log.info("upgrading the user-data schema from %s to %s", current or "empty", head)
                command.upgrade(alembic_config(conn), "head")
                conn.commit()
            return head
        finally:
            if db.dialect == "postgresql":
                conn.rollback()
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _lock_key()})
                conn.commit()


def _lock_key() -> int:
    from userdata.db import MIGRATION_LOCK_ID

    return MIGRATION_LOCK_ID
