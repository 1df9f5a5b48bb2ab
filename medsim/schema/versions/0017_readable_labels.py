"""Label names people can read: RetinaMNIST's "0" ... "4" become diabetic-retinopathy
grades, "grade 0 (no retinopathy)" ... "grade 4 (proliferative)" (medsim.sources.medmnist
.READABLE_LABELS, which new ingests use). Only a MedMNIST retina dataset still holding the
bare digits is renamed; labels themselves (the stored integers) do not change, so label
keys, calibrations and indexes stay valid. A filter on label "2" becomes "grade 2 (moderate)".

The access log also records what the page's workbench serves: previews, stored
embeddings, browse pages and exports; and uploads the service kept for their URL
(medsim.uploads, deleted after their retention, each deletion logged).

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
    _actions(("search", "image", "thumbnail", "preview", "embedding", "browse", "export", "upload_deleted", "explain"))
    op.execute("""
        CREATE TABLE medsim.uploads (
            handle      text PRIMARY KEY,          -- 128 random bits, URL-safe
            created_at  timestamptz NOT NULL DEFAULT now(),
            expires_at  timestamptz NOT NULL,
            user_name   text NOT NULL,
            sha256      text NOT NULL,             -- of the uploaded bytes, as the access log has it
            pixels      bytea NOT NULL,            -- the stored form, never the file or its name
            height      integer NOT NULL CHECK (height > 0),
            width       integer NOT NULL CHECK (width > 0),
            channels    smallint NOT NULL CHECK (channels IN (1, 3)),
            bit_depth   smallint NOT NULL CHECK (bit_depth IN (8, 16))
        )
    """)
    op.execute("CREATE INDEX uploads_expires_at ON medsim.uploads (expires_at)")


def downgrade() -> None:
    op.execute("DROP TABLE medsim.uploads")
    # an audit log keeps its rows: each new action becomes the nearest old one
    op.execute("""UPDATE medsim.access_log SET action = CASE action WHEN 'preview' THEN 'thumbnail'
                  WHEN 'export' THEN 'search' WHEN 'upload_deleted' THEN 'search' ELSE 'image' END
                  WHERE action IN ('preview', 'embedding', 'browse', 'export', 'upload_deleted', 'explain')""")
    _actions(("search", "image", "thumbnail"))
    _rename(GRADES, DIGITS)
