"""Voices, their stored prompt-cache entries, and the content-addressed blobs they use.

Revision ID: 0001_voices
Revises: (none)
"""

import sqlalchemy as sa
from alembic import op

revision = "0001_voices"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "blobs",
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("sha256", name="pk_blobs"),
    )
    op.create_table(
        "voices",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("transcript", sa.Text(), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("sample_rate", sa.Integer(), nullable=False),
        sa.Column("duration_s", sa.Float(), nullable=False),
        sa.Column("source_channels", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("audio_sha256", sa.String(64), nullable=False),
        sa.Column("speaker_sha256", sa.String(64), nullable=True),
        sa.Column("namespaces", sa.Text(), nullable=False),
        sa.Column("nbytes", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_voices"),
        sa.ForeignKeyConstraint(["audio_sha256"], ["blobs.sha256"], name="fk_voices_audio_sha256_blobs"),
        sa.ForeignKeyConstraint(["speaker_sha256"], ["blobs.sha256"], name="fk_voices_speaker_sha256_blobs"),
    )
    op.create_index("ix_voices_digest", "voices", ["digest"])
    op.create_index("ix_voices_audio_sha256", "voices", ["audio_sha256"])
    op.create_index("ix_voices_speaker_sha256", "voices", ["speaker_sha256"])
    op.create_table(
        "voice_prompts",
        sa.Column("voice_id", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("namespace", sa.String(200), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("cost_s", sa.Float(), nullable=False),
        sa.Column("arrays_sha256", sa.String(64), nullable=True),
        sa.PrimaryKeyConstraint("voice_id", "kind", "namespace", name="pk_voice_prompts"),
        sa.ForeignKeyConstraint(["voice_id"], ["voices.id"], name="fk_voice_prompts_voice_id_voices",
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["arrays_sha256"], ["blobs.sha256"], name="fk_voice_prompts_arrays_sha256_blobs"),
    )
    op.create_index("ix_voice_prompts_lookup", "voice_prompts", ["kind", "namespace", "digest"])
    op.create_index("ix_voice_prompts_arrays_sha256", "voice_prompts", ["arrays_sha256"])


def downgrade() -> None:
    op.drop_table("voice_prompts")
    op.drop_table("voices")
    op.drop_table("blobs")
