"""Label names people can read: RetinaMNIST's "0" ... "4" become diabetic-retinopathy
grades, "grade 0 (no retinopathy)" ... "grade 4 (proliferative)" (medsim.sources.medmnist
.READABLE_LABELS, which new ingests use). Only a MedMNIST retina dataset still holding the
bare digits is renamed; labels themselves (the stored integers) do not change, so label
keys, calibrations and indexes stay valid. A filter on label "2" becomes "grade 2 (moderate)".

The access log also records what the page's workbench serves: previews, stored
embeddings, browse pages and exports.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-02
"""

import json

from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None

DIGITS = {str(i): str(i) for i in range(5)}
# a copy, not an import: a revision describes the schema as it was, whatever the code says later
GRADES = {"0": "grade 0 (no retinopathy)", "1": "grade 1 (mild)", "2": "grade 2 (moderate)",
          "3": "grade 3 (severe)", "4": "grade 4 (proliferative)"}


def _rename(old: dict, new: dict) -> None:
    op.execute(f"UPDATE medsim.datasets SET label_names = '{json.dumps(new)}'::jsonb "
               f"WHERE is_medmnist AND flag = 'retinamnist' AND label_names = '{json.dumps(old)}'::jsonb")


def _actions(actions: tuple) -> None:
    op.execute("ALTER TABLE medsim.access_log DROP CONSTRAINT access_log_action_check")
    op.execute(f"ALTER TABLE medsim.access_log ADD CONSTRAINT access_log_action_check "
               f"CHECK (action IN ({', '.join(repr(a) for a in actions)}))")


def upgrade() -> None:
    _rename(DIGITS, GRADES)
    _actions(("search", "image", "thumbnail", "preview", "embedding", "browse", "export"))


def downgrade() -> None:
    # an audit log keeps its rows: each new action becomes the nearest old one
    op.execute("""UPDATE medsim.access_log SET action = CASE action WHEN 'preview' THEN 'thumbnail'
                  WHEN 'export' THEN 'search' ELSE 'image' END
                  WHERE action IN ('preview', 'embedding', 'browse', 'export')""")
    _actions(("search", "image", "thumbnail"))
    _rename(GRADES, DIGITS)
