"""The user-data database: one SQLAlchemy engine, transactions, and the schema upgrade at start.

Owns: turning ``--database-url`` / ``--data-dir`` into an engine (default: an SQLite file
``<data_dir>/studio.db``; ``postgresql://...`` for a server shared by several hosts, driven by
psycopg 3), the connection settings that make it safe for several processes (SQLite: WAL, a busy
timeout, foreign keys, ``BEGIN IMMEDIATE`` for writes; PostgreSQL: a short connect timeout, and a
pool that is discarded when its server goes away, so the studio reconnects when it is back, without
a restart), the two kinds of transaction (:meth:`Database.read`, :meth:`Database.write`; one-statement
reads on PostgreSQL in autocommit, byte columns fetched in binary: :func:`first_row`), translating "the database
is unreachable" into :class:`StoreUnavailable` (503 + ``Retry-After`` at the HTTP edge),
the readiness probe, the online backup of an SQLite file, and running the Alembic migrations in
``userdata/migrations`` at start (a database whose schema is newer than this code refuses to
start with :class:`SchemaTooNew`).
Does not own: the tables (``userdata.schema``), what is stored in them (``userdata.voices``,
``userdata.blobs``), the HTTP answers (``web.deps``).

Guarantees: every write is one transaction (all of it or nothing survives a crash or kill -9);
SQLite writers serialize on the database lock and wait up to ``busy_timeout`` for it; two processes
starting at once upgrade the schema once (a file lock on SQLite, an advisory lock on PostgreSQL).
Not guaranteed: SQLite on a network filesystem (use PostgreSQL for several hosts).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import DatabaseError, DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from core.errors import StudioError

log = logging.getLogger(__name__)

SQLITE_FILE = "studio.db"
BUSY_TIMEOUT_MS = 10_000        # how long an SQLite writer waits for another process's transaction
CONNECT_TIMEOUT_S = 3           # PostgreSQL: a dead server is answered as 503 within this
RETRY_AFTER_S = 5               # what a 503 tells clients while the database is unreachable
MIGRATION_LOCK_ID = 0x57_55_44_42   # pg_advisory_lock key for schema upgrades ("WUDB")


class StoreUnavailable(StudioError):
    """The user-data database cannot be reached right now (answered as 503 with ``Retry-After``)."""

    def __init__(self, message: str, retry_after: float = RETRY_AFTER_S) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SchemaTooNew(StudioError):
    """The database was upgraded by a newer studio than this one; this code must not write to it."""


def database_url(settings) -> str:
    """The URL the settings name: ``database_url``, or the SQLite file in ``data_dir``."""
    if settings.database_url:
        return settings.database_url
    return f"sqlite:///{Path(settings.data_dir).resolve() / SQLITE_FILE}"


def _driver_url(url: str):
    """``postgresql://`` means psycopg 3 here (SQLAlchemy's default would be psycopg2)."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def redact(url: str) -> str:
    """The URL without its password, for logs and messages."""
    return make_url(url).render_as_string(hide_password=True)


class Database:
    """The engine of one user-data database; thread-safe, one per process.

    Parameters:
        url: an SQLAlchemy URL (``sqlite:///path`` or ``postgresql://user:pw@host/db``).
        pool_size: connections kept open (PostgreSQL).
    Raises:
        StudioError: the URL names a database kind this studio does not support.
    """

    def __init__(self, url: str, pool_size: int = 8) -> None:
        self.url = url
        self.schema_ready = False          # set by migrate(); read()/write() migrate first until then
        self._schema_lock = threading.Lock()
        parsed = _driver_url(url)
        self.dialect = parsed.get_backend_name()
        if self.dialect == "sqlite":
            self.path = Path(parsed.database) if parsed.database and parsed.database != ":memory:" else None
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self.engine = create_engine(parsed, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000,
                                                              "check_same_thread": False})
            _sqlite_events(self.engine)
            self.reader = self.engine
        elif self.dialect == "postgresql":
            self.path = None
            # No pre-ping (a round trip per checkout, the largest part of a small read): a connection
            # that died with its server fails its statement, SQLAlchemy then discards the whole pool,
            # that one request answers 503, and the next ones reconnect.
            options = dict(pool_size=pool_size, max_overflow=pool_size, pool_timeout=CONNECT_TIMEOUT_S,
                           pool_recycle=1800, connect_args={"connect_timeout": CONNECT_TIMEOUT_S,
                                                            "application_name": "step-audio-studio"})
            self.engine = create_engine(parsed, **options)
            # One-statement reads: connections that stay in autocommit, so a read is one round trip
            # (no BEGIN, no ROLLBACK, no isolation reset when the connection goes back to the pool).
            self.reader = create_engine(parsed, isolation_level="AUTOCOMMIT", pool_reset_on_return=None, **options)
        else:
            raise StudioError(f"database_url {redact(url)!r}: only sqlite:/// and postgresql:// are supported")

    def __repr__(self) -> str:
        return f"Database({redact(self.url)!r})"

    @contextmanager
    def read(self, snapshot: bool = True) -> Iterator[Connection]:
        """A read transaction (SQLite: deferred, so readers never wait for each other).

        ``snapshot=False`` is for a block that runs ONE statement: on PostgreSQL it then runs
        without BEGIN/ROLLBACK (autocommit; a single statement is consistent on its own), two
        round trips fewer, which is most of a small read's time over a network.

        Raises:
            StoreUnavailable: the database cannot be reached.
        """
        self._require_schema()
        if not snapshot and self.reader is not self.engine:
            with self._translated(), self.reader.connect() as conn:
                yield conn
            return
        with self._translated(), self.engine.connect() as conn, conn.begin():
            yield conn

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction: committed when the block ends, rolled back on any exception
        (SQLite: ``BEGIN IMMEDIATE``, so a read-then-write never loses a race to another process).

        Raises:
            StoreUnavailable: the database cannot be reached (or stayed locked past the busy timeout).
        """
        self._require_schema()
        with self._translated(), self.engine.connect() as conn:
            conn = conn.execution_options(studio_write=True)
            with conn.begin():
                yield conn

    def _require_schema(self) -> None:
        """Upgrade the schema on first use when the database was unreachable at start."""
        if not self.schema_ready:
            with self._schema_lock:
                if not self.schema_ready:
                    self.migrate()

    @contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except (OperationalError, PoolTimeout) as exc:
            raise self._unavailable(exc) from None
        except DBAPIError as exc:
            if exc.connection_invalidated:
                raise self._unavailable(exc) from None
            if type(exc) is DatabaseError:   # e.g. SQLite's "file is not a database"
                raise StudioError(f"the user-data database {redact(self.url)} cannot be read ({_reason(exc)}); "
                                  "restore it from a backup (docs/scaling.md)") from None
            raise

    def _unavailable(self, exc: Exception) -> StoreUnavailable:
        reason = _reason(exc)
        log.warning("user-data database %s unavailable: %s", redact(self.url), reason)
        return StoreUnavailable(f"the voice database is unavailable ({reason[:200]}); try again shortly")

    def ping(self) -> tuple[bool, str]:
        """(reachable, reason) for /readyz; never raises."""
        for attempt in range(2):   # the first try may meet a connection its server dropped earlier
            try:
                with self.read(snapshot=False) as conn:
                    conn.execute(text("SELECT 1"))
                return True, "ok"
            except StoreUnavailable as exc:
                if attempt:
                    return False, str(exc)
            except StudioError as exc:   # SchemaTooNew, a damaged file
                return False, str(exc)
            except Exception as exc:  # noqa: BLE001 - a probe answers, it never raises
                return False, f"database check failed: {type(exc).__name__}"
        return False, "unreachable"

    def migrate(self) -> str:
        """Upgrade the schema to this code's head (see ``userdata.migrations``); returns the revision.

        Raises:
            SchemaTooNew: the database's revision is unknown to this code (a newer studio wrote it).
            StoreUnavailable: the database cannot be reached.
        """
        from userdata.migrations import upgrade

        with self._translated():
            revision = upgrade(self)
        self.schema_ready = True
        return revision

    def backup(self, destination: Path | str) -> Path:
        """A consistent copy of an SQLite database file while it is in use (SQLite's online backup).

        Raises:
            StudioError: this is not an SQLite file database (use ``pg_dump`` for PostgreSQL).
        """
        if self.path is None:
            raise StudioError("backup() copies SQLite files; back up PostgreSQL with pg_dump (docs/scaling.md)")
        return backup_sqlite(self.path, destination)

    def close(self) -> None:
        self.engine.dispose()
        self.reader.dispose()


def first_row(conn: Connection, statement):
    """The first row of ``statement`` (or None), with byte columns fetched in binary on PostgreSQL.

    psycopg receives results as text by default, where ``bytea`` arrives hex-encoded: measured on
    loopback, a 161 kB blob took 4.7 ms as text and 0.2 ms in binary. So statements that read blobs
    run through a binary cursor of the same connection (and transaction). Column access is by name.
    """
    if conn.dialect.name != "postgresql":
        return conn.execute(statement).first()
    compiled = statement.compile(dialect=conn.dialect)
    raw = conn.connection.driver_connection
    try:
        with raw.cursor(binary=True) as cursor:
            cursor.execute(str(compiled), compiled.params)
            row = cursor.fetchone()
            names = [column.name for column in cursor.description or ()]
    except raw.OperationalError as exc:   # the same translation the Connection's own errors get
        raise OperationalError(str(compiled), compiled.params, exc) from None
    return None if row is None else _Row(zip(names, row))


class _Row(dict):
    """A result row read by name, as attributes (``row.data``)."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _reason(exc: Exception) -> str:
    """The first line of the driver's message (no SQL, no parameters)."""
    message = str(getattr(exc, "orig", None) or exc).strip()
    return message.splitlines()[0] if message else type(exc).__name__


def backup_sqlite(source: Path | str, destination: Path | str) -> Path:
    """Copy the SQLite database ``source`` to ``destination`` with SQLite's online backup API (a
    consistent snapshot even while other processes write; the copy is a plain single file)."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = destination.with_name(destination.name + ".partial")
    tmp.unlink(missing_ok=True)
    src = sqlite3.connect(f"file:{Path(source)}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
    dst = sqlite3.connect(tmp)
    try:
        with dst:
            src.backup(dst)
        dst.execute("PRAGMA journal_mode=DELETE")   # a single self-contained file, no -wal beside it
    finally:
        dst.close()
        src.close()
    tmp.replace(destination)
    return destination


def _sqlite_events(engine: Engine) -> None:
    """WAL, busy timeout, foreign keys; and our own BEGIN, because Python's sqlite3 module would
    otherwise begin transactions itself (lazily, and never IMMEDIATE)."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None   # the driver leaves transactions to us
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode=WAL")      # readers do not block the writer, nor it them
        cursor.execute("PRAGMA synchronous=FULL")      # a committed voice survives power loss too
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("studio_write") else "BEGIN")


def open_database(settings, wait_for_server: bool = True) -> Database:
    """The database the settings name, with its schema upgraded.

    A database server that cannot be reached at start (``wait_for_server``) is not fatal: the
    studio starts, requests that need the database answer 503 and ``/readyz`` says why, and the
    schema is upgraded on the first request after the server is back.

    Raises:
        SchemaTooNew: the database is newer than this code (the studio must not start).
        StoreUnavailable: unreachable, and ``wait_for_server`` is False.
        StudioError: an unsupported or damaged database.
    """
    if not settings.database_url:
        Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    db = Database(database_url(settings))
    try:
        revision = db.migrate()
    except StoreUnavailable:
        if not wait_for_server:
            raise
        log.warning("user-data database %s is unreachable at start; voices answer 503 until it is back",
                    redact(db.url))
        return db
    log.info("user-data database %s at schema revision %s", redact(db.url), revision)
    return db
