"""Calibrated answers: per model and dataset, distance -> P(same diagnosis), vote share ->
P(the neighbours' vote is right) (medsim/training/calibration.py).

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-28
"""

from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
        CREATE TABLE medsim.calibrations (
            model_id    integer NOT NULL REFERENCES medsim.models (id) ON DELETE CASCADE,
            dataset     text NOT NULL,
            a           double precision NOT NULL,   -- P(same) = 1 / (1 + exp(-(a + b * distance)))
            b           double precision NOT NULL,
            vote_a      double precision NOT NULL,   -- P(vote right) = 1 / (1 + exp(-(vote_a + vote_b * share)))
            vote_b      double precision NOT NULL,
            report      jsonb NOT NULL,              -- pairs, ECE on val and test, reliability bins
            created_at  timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (model_id, dataset)
        )
    """)


def downgrade() -> None:
    op.execute("DROP TABLE medsim.calibrations")
