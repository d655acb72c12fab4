"""userdata.db and userdata.migrations: the schema at start, its version check, the unreachable
database, and the SQLite backup (on SQLite always; on a real PostgreSQL when it is installed)."""

from __future__ import annotations

import sqlite3

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from core.errors import StudioError
from userdata import blobs
from userdata.db import Database, SchemaTooNew, StoreUnavailable, backup_sqlite
from userdata.migrations import head_revision
from userdata.schema import METADATA


def test_migrations_create_what_the_schema_module_describes(database_url):
    db = Database(database_url)
    assert db.migrate() == head_revision()
    assert {"blobs", "voices", "voice_prompts", "alembic_version"} <= set(inspect(db.engine).get_table_names())
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), METADATA)
    assert diff == [], f"userdata/schema.py and the migrations disagree: {diff}"
    assert db.migrate() == head_revision()   # a second start changes nothing
    db.close()


def test_a_newer_schema_refuses_to_start_with_a_clear_message(database_url):
    db = Database(database_url)
    db.migrate()
    with db.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0099_from_the_future'"))
    with pytest.raises(SchemaTooNew, match="0099_from_the_future.*newer studio"):
        db.migrate()
    db.close()


def test_blobs_are_stored_once_and_released_when_unreferenced(database_url):
    db = Database(database_url)
    db.migrate()
    with db.write() as conn:
        first = blobs.put(conn, b"abc" * 1000)
        assert blobs.put(conn, b"abc" * 1000) == first
    with db.read() as conn:
        assert blobs.get(conn, first) == b"abc" * 1000
        assert conn.execute(text("SELECT count(*) FROM blobs")).scalar() == 1
    with db.write() as conn:
        assert blobs.release(conn, [first, None]) == 1
    with db.read() as conn, pytest.raises(KeyError):
        blobs.get(conn, first)
    db.close()


def test_a_failed_write_leaves_nothing(database_url):
    db = Database(database_url)
    db.migrate()
    with pytest.raises(RuntimeError), db.write() as conn:
        blobs.put(conn, b"half")
        raise RuntimeError("crash in the middle")
    with db.read() as conn:
        assert conn.execute(text("SELECT count(*) FROM blobs")).scalar() == 0
    db.close()


def test_an_unreachable_database_is_store_unavailable_and_recovers(postgres):
    from tests.conftest import fresh_pg_database

    db = Database(fresh_pg_database(postgres))
    db.migrate()
    assert db.ping() == (True, "ok")
    postgres.stop("immediate")
    try:
        ok, reason = db.ping()
        assert not ok and "unavailable" in reason
        with pytest.raises(StoreUnavailable) as info, db.read() as conn:
            conn.execute(text("SELECT 1"))
        assert info.value.retry_after > 0
    finally:
        postgres.start()
    assert db.ping() == (True, "ok")   # the same engine, no restart
    db.close()


def test_a_damaged_sqlite_file_is_named_with_what_to_do(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    db = Database(f"sqlite:///{folder / 'studio.db'}")
    db.migrate()
    db.close()
    (folder / "studio.db").write_bytes(b"this is not a database")
    broken = Database(f"sqlite:///{folder / 'studio.db'}")
    with pytest.raises(StudioError, match="cannot be read.*backup"):
        broken.migrate()


def test_backup_restores_a_consistent_copy(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'studio.db'}")
    db.migrate()
    with db.write() as conn:
        ref = blobs.put(conn, b"keep me")
    copy = db.backup(tmp_path / "backup" / "studio.db")
    with db.write() as conn:           # changes after the backup are not in it
        blobs.put(conn, b"later")
    db.close()
    restored = Database(f"sqlite:///{copy}")
    assert restored.migrate() == head_revision()
    with restored.read() as conn:
        assert blobs.get(conn, ref) == b"keep me"
        assert conn.execute(text("SELECT count(*) FROM blobs")).scalar() == 1
    assert sqlite3.connect(copy).execute("PRAGMA integrity_check").fetchone() == ("ok",)
    with pytest.raises(StudioError, match="pg_dump"):
        Database("postgresql://nobody@127.0.0.1:1/x").backup(tmp_path / "x")
    assert backup_sqlite(copy, tmp_path / "again.db").exists()
