"""Embeddings (pgvector) per (model, image), the embedding work queue, status view.

One untyped `vector` column holds every model's embeddings (pgvector's approach for
mixed dimensions); a trigger enforces each model's dimension, and each model gets its
own partial expression HNSW index ((embedding::vector(N)) ... WHERE model_id = M).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE medsim.embeddings (
            model_id    integer NOT NULL REFERENCES medsim.models (id) ON DELETE CASCADE,
            image_id    bigint NOT NULL REFERENCES medsim.images (id) ON DELETE CASCADE,
            embedding   vector NOT NULL,
            created_at  timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (model_id, image_id)
        )
        """
    )
    op.execute("CREATE INDEX embeddings_image_idx ON medsim.embeddings (image_id)")
    # Work still to do, one row per (model, image). Failures are rows too: attempts,
    # the last error, when to retry, and failed_at once the attempts are used up.
    op.execute(
        """
        CREATE TABLE medsim.embedding_queue (
            model_id     integer NOT NULL REFERENCES medsim.models (id) ON DELETE CASCADE,
            image_id     bigint NOT NULL REFERENCES medsim.images (id) ON DELETE CASCADE,
            attempts     integer NOT NULL DEFAULT 0,
            last_error   text,
            retry_after  timestamptz NOT NULL DEFAULT now(),
            failed_at    timestamptz,
            enqueued_at  timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (model_id, image_id)
        )
        """
    )
    op.execute("CREATE INDEX embedding_queue_image_idx ON medsim.embedding_queue (image_id)")
    # the dimension check and the new-image NOTIFY (functions and triggers) live in
    # sql/002_embeddings.sql, applied once the database reaches head


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS images_notify ON medsim.images")
    op.execute("DROP VIEW IF EXISTS medsim.embedding_status")
    op.execute("DROP TABLE medsim.embedding_queue")
    op.execute("DROP TABLE medsim.embeddings")
    op.execute("DROP FUNCTION IF EXISTS medsim.notify_new_images()")
    op.execute("DROP FUNCTION IF EXISTS medsim.check_embedding_dim()")
