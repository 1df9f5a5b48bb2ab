"""Leakage audits: exact and near duplicates, and patients in two splits.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-28
"""

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
        CREATE TABLE medsim.audits (
            id          integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            model_id    integer REFERENCES medsim.models (id) ON DELETE CASCADE,
            threshold   double precision,       -- embedding distance under which images are near duplicates
            summary     jsonb NOT NULL,
            created_at  timestamptz NOT NULL DEFAULT now()
        )
    """)
    op.execute("""
        CREATE TABLE medsim.audit_findings (
            audit_id   integer NOT NULL REFERENCES medsim.audits (id) ON DELETE CASCADE,
            kind       text NOT NULL CHECK (kind IN ('exact', 'near', 'patient')),
            image_a    bigint NOT NULL REFERENCES medsim.images (id) ON DELETE CASCADE,
            image_b    bigint NOT NULL REFERENCES medsim.images (id) ON DELETE CASCADE,
            split_a    text NOT NULL,
            split_b    text NOT NULL,
            distance   double precision         -- for 'near'
        )
    """)
    op.execute("CREATE INDEX audit_findings_audit_idx ON medsim.audit_findings (audit_id, kind)")


def downgrade() -> None:
    op.execute("DROP TABLE medsim.audit_findings")
    op.execute("DROP TABLE medsim.audits")
