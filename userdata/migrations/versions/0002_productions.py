"""Productions, their segments and takes (take audio in the blobs table).

Revision ID: 0002_productions
Revises: 0001_voices
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_productions"
down_revision = "0001_voices"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "productions",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("title", sa.String(200), nullable=False),
        sa.Column("source_kind", sa.String(16), nullable=False),
        sa.Column("fit_to_cue", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_productions"),
    )
    op.create_table(
        "segments",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("production_id", sa.String(64), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("speaker", sa.String(100), nullable=False),
        sa.Column("voice_id", sa.String(64), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("instructions", sa.Text(), nullable=False),
        sa.Column("pause_ms", sa.Integer(), nullable=False),
        sa.Column("target_start_ms", sa.BigInteger(), nullable=True),
        sa.Column("target_end_ms", sa.BigInteger(), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("chosen_take_id", sa.String(64), nullable=True),
        sa.Column("note", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_segments"),
        sa.ForeignKeyConstraint(["production_id"], ["productions.id"], name="fk_segments_production_id_productions",
                                ondelete="CASCADE"),
    )
    op.create_index("ix_segments_voice_id", "segments", ["voice_id"])
    op.create_index("ix_segments_production_position", "segments", ["production_id", "position"])
    op.create_table(
        "takes",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("segment_id", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("source", sa.String(100), nullable=False),
        sa.Column("parent_take_id", sa.String(64), nullable=True),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("voice_id", sa.String(64), nullable=False),
        sa.Column("duration_ms", sa.BigInteger(), nullable=False),
        sa.Column("sample_rate", sa.Integer(), nullable=False),
        sa.Column("audio_sha256", sa.String(64), nullable=False),
        sa.Column("timings", sa.Text(), nullable=False),
        sa.Column("scores", sa.Text(), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_takes"),
        sa.ForeignKeyConstraint(["segment_id"], ["segments.id"], name="fk_takes_segment_id_segments", ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["audio_sha256"], ["blobs.sha256"], name="fk_takes_audio_sha256_blobs"),
    )
    op.create_index("ix_takes_segment_id", "takes", ["segment_id"])
    op.create_index("ix_takes_audio_sha256", "takes", ["audio_sha256"])


def downgrade() -> None:
    op.drop_table("takes")
    op.drop_table("segments")
    op.drop_table("productions")
