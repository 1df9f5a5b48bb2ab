"""A per-model gallery version: a FAISS index's freshness in one indexed lookup.

Every statement that adds, re-embeds or removes a model's embeddings (and every change of
an image's split) bumps its model's row here (triggers in sql/002_embeddings.sql). A build
records the version it read; an index is fresh while the version is unchanged. Before,
freshness meant hashing every vector of the gallery (Q.embedding_fingerprint), which the
HTTP service cannot afford per request and which grows with the gallery.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-28
"""

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
        CREATE TABLE medsim.gallery_versions (
            model_id    integer PRIMARY KEY REFERENCES medsim.models (id) ON DELETE CASCADE,
            version     bigint NOT NULL DEFAULT 1,
            changed_at  timestamptz NOT NULL DEFAULT now()
        )
    """)
    # Models that already have embeddings start at version 1; builds made before this
    # revision have no version and are still checked by their fingerprint.
    op.execute("""
        INSERT INTO medsim.gallery_versions (model_id)
        SELECT DISTINCT model_id FROM medsim.embeddings
    """)
    op.execute("ALTER TABLE medsim.index_builds ADD COLUMN gallery_version bigint")


def downgrade() -> None:
    op.execute("ALTER TABLE medsim.index_builds DROP COLUMN gallery_version")
    op.execute("DROP TABLE medsim.gallery_versions")
