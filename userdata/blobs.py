"""Content-addressed bytes in the user-data database (the ``blobs`` table).

Owns: storing bytes under their SHA-256 once however many rows use them (:func:`put`), reading them
back checked against their hash (:func:`get`), and deleting the blobs no row references any more
(:func:`release`), and finding blobs nothing references (:func:`unreferenced`, for checks). Every function takes the caller's open transaction, so a blob and the row that
references it commit together.
Does not own: which rows reference blobs (``userdata.schema.BLOB_REFERENCES`` lists them), the
transaction (``userdata.db``).
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Iterable

from sqlalchemy import and_, delete, exists, not_, select
from sqlalchemy.engine import Connection

from core.errors import StudioError
from userdata.db import first_row
from userdata.schema import BLOB_REFERENCES, blobs

log = logging.getLogger(__name__)


class BlobCorrupt(StudioError):
    """A stored blob does not match its hash (damaged storage)."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def put(conn: Connection, data: bytes) -> str:
    """Store ``data`` (if not stored yet) and return its SHA-256 hex, the reference to keep."""
    digest = sha256_hex(data)
    # Look first instead of INSERT .. ON CONFLICT: it is portable and the writer holds the lock
    # (SQLite BEGIN IMMEDIATE); on PostgreSQL a concurrent insert of the same bytes fails the
    # transaction with an IntegrityError, which the caller retries.
    if conn.execute(select(blobs.c.size).where(blobs.c.sha256 == digest)).first() is None:
        conn.execute(blobs.insert().values(sha256=digest, size=len(data), data=data, created_at=time.time()))
    return digest


def get(conn: Connection, digest: str) -> bytes:
    """The bytes stored under ``digest``.

    Raises:
        KeyError: no such blob.
        BlobCorrupt: the stored bytes do not hash to ``digest``.
    """
    row = first_row(conn, select(blobs.c.data).where(blobs.c.sha256 == digest))
    if row is None:
        raise KeyError(digest)
    data = bytes(row.data)
    if sha256_hex(data) != digest:
        log.error("blob %s is damaged (its bytes hash differently)", digest[:12])
        raise BlobCorrupt(f"stored data {digest[:12]} is damaged")
    return data


def release(conn: Connection, digests: Iterable[str | None]) -> int:
    """Delete those of ``digests`` that no row references any more; returns how many went."""
    wanted = sorted({d for d in digests if d})
    if not wanted:
        return 0
    unused = [not_(exists().where(getattr(table.c, column) == blobs.c.sha256)) for table, column in BLOB_REFERENCES]
    result = conn.execute(delete(blobs).where(and_(blobs.c.sha256.in_(wanted), *unused)))
    return int(result.rowcount or 0)


def unreferenced(conn: Connection) -> list[str]:
    """Blobs no row references (should be none: every delete releases its blobs in its transaction)."""
    unused = [not_(exists().where(getattr(table.c, column) == blobs.c.sha256)) for table, column in BLOB_REFERENCES]
    return [digest for (digest,) in conn.execute(select(blobs.c.sha256).where(and_(*unused)))]
