"""Takes keep the words heard in them with their times (productions' word-level captions).

Revision ID: 0003_take_words
Revises: 0002_productions
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_take_words"
down_revision = "0002_productions"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Takes made before this revision were never timed: they read as no words (segment-level captions).
    with op.batch_alter_table("takes") as batch:
        batch.add_column(sa.Column("words", sa.Text(), nullable=False, server_default="[]"))


def downgrade() -> None:
    with op.batch_alter_table("takes") as batch:
        batch.drop_column("words")
