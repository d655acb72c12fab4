"""The user-data tables, as SQLAlchemy Core ``Table`` objects (one ``METADATA`` for all of them).

Owns: table and column names, types, keys and indexes of what users make: ``blobs`` (content-
addressed bytes: audio, arrays), ``voices`` and ``voice_prompts`` (the prompt-cache entries stored
with a voice). These objects mirror the Alembic revisions in ``userdata/migrations/versions``,
which are what creates them; ``tests/test_userdata_db.py`` checks that the two agree.
Does not own: creating or changing tables (the migrations), reading or writing rows
(``userdata.blobs``, ``userdata.voices``).

Times are Unix seconds (float). Blob references are SHA-256 hex of the bytes; a blob row is deleted
when the last row that references it is (``userdata.blobs.release``).
"""

from __future__ import annotations

from sqlalchemy import (BigInteger, Column, Float, ForeignKey, Index, Integer, LargeBinary, MetaData, String,
                        Table, Text)

# Constraint names are fixed so that later migrations can refer to them on every backend.
METADATA = MetaData(naming_convention={
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
})

SHA256_LEN = 64
ID_LEN = 64

blobs = Table(
    "blobs", METADATA,
    Column("sha256", String(SHA256_LEN), primary_key=True),
    Column("size", BigInteger, nullable=False),
    Column("data", LargeBinary, nullable=False),          # bytea on PostgreSQL, BLOB on SQLite
    Column("created_at", Float, nullable=False),
)

voices = Table(
    "voices", METADATA,
    Column("id", String(ID_LEN), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("transcript", Text, nullable=False),
    Column("digest", String(SHA256_LEN), nullable=False, index=True),   # funasr_cache.audio_digest
    Column("sample_rate", Integer, nullable=False),
    Column("duration_s", Float, nullable=False),
    Column("source_channels", Integer, nullable=False),                # channels of the upload
    Column("created_at", Float, nullable=False),
    # mono float32 WAV of the samples the engine consumed (bit-exact: same digest)
    Column("audio_sha256", String(SHA256_LEN), ForeignKey("blobs.sha256"), nullable=False, index=True),
    # .npy of what the clone speaker id hashes of a multi-channel upload (None: mono upload)
    Column("speaker_sha256", String(SHA256_LEN), ForeignKey("blobs.sha256"), nullable=True, index=True),
    Column("namespaces", Text, nullable=False),             # JSON: kind -> cache namespace at creation
    Column("nbytes", BigInteger, nullable=False),           # audio + speaker + prompt blobs (quota)
)

voice_prompts = Table(
    "voice_prompts", METADATA,
    Column("voice_id", String(ID_LEN), ForeignKey("voices.id", ondelete="CASCADE"), primary_key=True),
    Column("kind", String(64), primary_key=True),
    Column("namespace", String(200), primary_key=True),
    Column("digest", String(SHA256_LEN), nullable=False),
    Column("payload", Text, nullable=False),                # JSON, as the cache stores it
    Column("cost_s", Float, nullable=False),
    Column("arrays_sha256", String(SHA256_LEN), ForeignKey("blobs.sha256"), nullable=True, index=True),
    Index("ix_voice_prompts_lookup", "kind", "namespace", "digest"),
)

# Every (table, column) that references blobs.sha256; blobs.release checks them all. Later
# revisions (productions, takes) append theirs.
BLOB_REFERENCES: list[tuple[Table, str]] = [
    (voices, "audio_sha256"),
    (voices, "speaker_sha256"),
    (voice_prompts, "arrays_sha256"),
]


# --- productions (issue 23; revision 0002): scripts made segment by segment, take by take.
# A segment's voice_id is not a foreign key: deleting a voice must not delete (or be blocked by) the
# productions that used it; their segments then say that the voice is gone.
productions = Table(
    "productions", METADATA,
    Column("id", String(ID_LEN), primary_key=True),
    Column("title", String(200), nullable=False),
    Column("source_kind", String(16), nullable=False),      # text | script | srt
    Column("fit_to_cue", Integer, nullable=False),          # 0/1: speed takes up to fit their SRT cue
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)

segments = Table(
    "segments", METADATA,
    Column("id", String(ID_LEN), primary_key=True),
    Column("production_id", String(ID_LEN), ForeignKey("productions.id", ondelete="CASCADE"), nullable=False),
    Column("position", Integer, nullable=False),
    Column("speaker", String(100), nullable=False),
    Column("voice_id", String(ID_LEN), nullable=False, index=True),
    Column("text", Text, nullable=False),
    Column("instructions", Text, nullable=False),
    Column("pause_ms", Integer, nullable=False),
    Column("target_start_ms", BigInteger, nullable=True),
    Column("target_end_ms", BigInteger, nullable=True),
    Column("state", String(16), nullable=False),            # pending | generating | ready | failed
    Column("chosen_take_id", String(ID_LEN), nullable=True),
    Column("note", Text, nullable=False),
    Index("ix_segments_production_position", "production_id", "position"),
)

takes = Table(
    "takes", METADATA,
    Column("id", String(ID_LEN), primary_key=True),
    Column("segment_id", String(ID_LEN), ForeignKey("segments.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("created_at", Float, nullable=False),
    Column("seed", BigInteger, nullable=False),
    Column("source", String(100), nullable=False),          # generate | regenerate | edit:<type>:<option> | fit:<speed>
    Column("parent_take_id", String(ID_LEN), nullable=True),
    Column("text", Text, nullable=False),
    Column("voice_id", String(ID_LEN), nullable=False),
    Column("duration_ms", BigInteger, nullable=False),
    Column("sample_rate", Integer, nullable=False),
    # float32 WAV of the take's exact samples (edits and renders never re-decode a lossy copy)
    Column("audio_sha256", String(SHA256_LEN), ForeignKey("blobs.sha256"), nullable=False, index=True),
    Column("timings", Text, nullable=False),                # JSON: stage -> ms
    Column("scores", Text, nullable=False),                 # JSON: scorer -> value (empty without scorers)
    Column("note", Text, nullable=False),
    # JSON: [{"word", "start", "end"}] heard in the take, for word captions (revision 0003; [] when untimed)
    Column("words", Text, nullable=False, server_default="[]"),
)

BLOB_REFERENCES.append((takes, "audio_sha256"))
