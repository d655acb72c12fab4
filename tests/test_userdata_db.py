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


def test_compose_and_image_keep_user_data_in_its_own_volume_and_offer_postgres():
    import yaml

    from testkit.paths import ROOT

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name in ("studio", "studio-2", "studio-vllm"):
        assert "studio-data:/app/data" in compose["services"][name]["volumes"]
    postgres = compose["services"]["postgres"]
    assert postgres["profiles"] == ["postgres"] and postgres["image"].startswith("postgres:")
    assert postgres["environment"]["POSTGRES_PASSWORD"] == "${POSTGRES_PASSWORD:-}"   # from the environment
    assert "studio-postgres:/var/lib/postgresql/data" in postgres["volumes"]
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert {"studio-data", "studio-postgres"} <= set(compose["volumes"])
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert '"/app/data"]' in dockerfile and "STUDIO_DATA_DIR=/app/data" in dockerfile
    assert "data" in (ROOT / ".dockerignore").read_text().splitlines()   # a local database never enters the image


def _voice_store(url):
    from userdata.voices import VoiceStore

    db = Database(url)
    db.migrate()
    return VoiceStore(db)


def _clip(seed):
    import numpy as np

    from core.audio_io import Audio

    return Audio((0.2 * np.random.default_rng(seed).standard_normal(8000)).astype(np.float32), 16000)


def test_the_backup_command_and_restoring_it(tmp_path, capsys):
    from userdata.__main__ import main

    flags = ["--data-dir", str(tmp_path / "data")]
    store = _voice_store(f"sqlite:///{tmp_path / 'data' / 'studio.db'}")
    kept = store.create(_clip(1), "kept words", "kept")
    assert main(["backup", str(tmp_path / "backup.db"), *flags]) == 0      # while the store is open
    later = store.create(_clip(2), "made after the backup", "later")
    store.delete(kept.id)
    assert main(["restore", str(tmp_path / "backup.db"), *flags]) == 0
    assert [v.id for v in store.list()] == [kept.id]                        # the running store sees it
    assert store.audio(kept.id).samples.tobytes() == _clip(1).samples.tobytes()
    with pytest.raises(Exception):
        store.get(later.id)
    assert main(["check", *flags]) == 0 and "0 problem(s)" in capsys.readouterr().out
    (tmp_path / "junk.db").write_bytes(b"not a database at all" * 100)
    assert main(["restore", str(tmp_path / "junk.db"), *flags]) == 1
    assert "not a studio database" in capsys.readouterr().err
    assert [v.id for v in store.list()] == [kept.id]


def test_pg_dump_and_pg_restore_round_trip_the_voices(postgres, tmp_path):
    import subprocess

    from tests.conftest import fresh_pg_database

    source = fresh_pg_database(postgres)
    store = _voice_store(source)
    voice = store.create(_clip(3), "dumped words", "dumped")
    dump = tmp_path / "studio.dump"
    subprocess.run([str(postgres.bindir / "pg_dump"), "-Fc", "-f", str(dump), source], check=True, timeout=120)
    target = fresh_pg_database(postgres)
    subprocess.run([str(postgres.bindir / "pg_restore"), "--no-owner", "-d", target, str(dump)], check=True,
                   timeout=120)
    restored = _voice_store(target)
    assert [v.id for v in restored.list()] == [voice.id] and restored.check() == []
    assert restored.audio(voice.id).samples.tobytes() == _clip(3).samples.tobytes()


def test_the_studio_refuses_to_start_on_a_newer_schema_and_names_unsupported_urls(tmp_path):
    from core.settings import load_settings
    from funasr_cache.store import PromptCache
    from preview.engine import PreviewEngine
    from web.server import create_app

    settings = load_settings(["--data-dir", str(tmp_path / "data"), "--cache-dir", str(tmp_path / "cache")], env={})
    db = Database(f"sqlite:///{tmp_path / 'data' / 'studio.db'}")
    db.migrate()
    with db.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0042_later'"))
    db.close()
    engine = PreviewEngine(settings, PromptCache.from_settings(settings))
    try:
        with pytest.raises(SchemaTooNew, match="0042_later"):
            create_app(engine, settings)
    finally:
        engine.close()
    with pytest.raises(StudioError, match="only sqlite:/// and postgresql://"):
        Database("mysql://user@host/db")
