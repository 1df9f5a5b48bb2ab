"""FAISS index builds and recall reports; gallery/query views.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE medsim.index_builds (
            id             integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            model_id       integer NOT NULL REFERENCES medsim.models (id) ON DELETE CASCADE,
            kind           text NOT NULL,
            params         jsonb NOT NULL,
            source_view    text NOT NULL,
            splits         text[] NOT NULL,
            dim            integer NOT NULL,
            metric         text NOT NULL,
            n_rows         bigint NOT NULL,
            fingerprint    text NOT NULL,
            path           text NOT NULL,
            build_seconds  double precision NOT NULL,
            created_at     timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    op.execute(
        """
        CREATE TABLE medsim.recall_reports (
            id          integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            model_id    integer NOT NULL REFERENCES medsim.models (id) ON DELETE CASCADE,
            build_ids   integer[] NOT NULL,
            report      jsonb NOT NULL,
            created_at  timestamptz NOT NULL DEFAULT now()
        )
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE medsim.recall_reports")
    op.execute("DROP TABLE medsim.index_builds")
    op.execute("DROP VIEW IF EXISTS medsim.query_images")
    op.execute("DROP VIEW IF EXISTS medsim.gallery")
    op.execute("DROP VIEW IF EXISTS medsim.embedded_images")
