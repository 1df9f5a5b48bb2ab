"""A new model without downtime: candidates, promotions, rollback.

- models.candidate: registered by `medsim train` while another model is current; workers
  embed its gallery after the current model's backlog, searches keep the current model
  until `medsim models promote` makes it current (search/promotion.py).
- models.promote_when_ready: promote it as soon as its gallery is complete (a worker does).
- medsim.model_promotions: every change of the current model (promote, rollback, set),
  with the model it replaced and how many gallery images it had no embedding for (0 unless
  forced): `medsim models rollback` returns to the previous one.

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-08
"""

from alembic import op

revision = "0020"
down_revision = "0019"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE medsim.models ADD COLUMN candidate boolean NOT NULL DEFAULT false, "
               "ADD COLUMN promote_when_ready boolean NOT NULL DEFAULT false")
    op.execute("""
        CREATE TABLE medsim.model_promotions (
            id           integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            model_id     integer NOT NULL REFERENCES medsim.models (id) ON DELETE CASCADE,
            previous_id  integer REFERENCES medsim.models (id) ON DELETE SET NULL,
            kind         text NOT NULL CHECK (kind IN ('promote', 'rollback', 'set')),
            missing      integer NOT NULL DEFAULT 0,   -- gallery images without its embedding (forced)
            by_user      text,
            at           timestamptz NOT NULL DEFAULT now()
        )
    """)


def downgrade() -> None:
    op.execute("DROP TABLE medsim.model_promotions")
    op.execute("ALTER TABLE medsim.models DROP COLUMN candidate, DROP COLUMN promote_when_ready")
