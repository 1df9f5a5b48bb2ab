"""Deletions: what was deleted and when (never the deleted content), so that FAISS
indexes built before a deletion refuse to load.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-28
"""

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
        CREATE TABLE medsim.deletions (
            id           integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            kind         text NOT NULL CHECK (kind IN ('dataset', 'patient', 'images')),
            -- the dataset's name, the patient's keyed hash, or how many image ids: never pixels
            target       text NOT NULL,
            images       integer NOT NULL,
            embeddings   integer NOT NULL,
            reason       text,
            deleted_at   timestamptz NOT NULL DEFAULT now()
        )
    """)


def downgrade() -> None:
    op.execute("DROP TABLE medsim.deletions")
