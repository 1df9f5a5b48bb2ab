"""A model that was not trained here: an imported ONNX encoder (`medsim models import`).

- models.mode gains 'imported': the registry's row for a frozen external encoder, its
  checkpoint the container medsim/model/imported.py writes (the ONNX file's bytes, and a
  contrastive head when `medsim train --on` made one, which is trained: mode 'label').

Revision ID: 0022
Revises: 0021
Create Date: 2026-12-08
"""

from alembic import op

revision = "0022"
down_revision = "0021"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE medsim.models DROP CONSTRAINT IF EXISTS models_mode_check")
    op.execute("ALTER TABLE medsim.models ADD CONSTRAINT models_mode_check "
               "CHECK (mode IN ('dataset', 'label', 'imported'))")


def downgrade() -> None:
    op.execute("ALTER TABLE medsim.models DROP CONSTRAINT IF EXISTS models_mode_check")
    op.execute("ALTER TABLE medsim.models ADD CONSTRAINT models_mode_check CHECK (mode IN ('dataset', 'label'))")
