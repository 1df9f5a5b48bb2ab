"""Replaceable objects (sql/) are applied after the revisions, at head; embedding_status
without the models x images cross product.

No table changes: this revision moves the schema version so that a database migrated by
an older medsim (whose revisions applied sql/ one file at a time) is told to run
`medsim migrate`, which applies the current sql/ set.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28
"""


revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass  # db/env.py applies sql/ once the database is at head


def downgrade() -> None:
    # Below head the replaceable objects of this code no longer apply; the older
    # revisions' downgrades drop what depends on their tables (IF EXISTS).
    pass
