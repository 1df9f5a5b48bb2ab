"""Hardening: FAISS index files tied to their build (checksum, size).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-28
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # NULL for builds recorded before this revision: their files carry no checksum and
    # are refused on load until rebuilt
    op.execute("ALTER TABLE medsim.index_builds ADD COLUMN file_sha256 text, ADD COLUMN file_bytes bigint")


def downgrade() -> None:
    op.execute("ALTER TABLE medsim.index_builds DROP COLUMN file_sha256, DROP COLUMN file_bytes")
