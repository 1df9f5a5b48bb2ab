"""Integrity and privacy: one pseudonym key per database, label conflicts as findings,
interrupted ingests, audit findings that say when identical pixels carry different labels.

- medsim.pseudonym_keys: the fingerprints of the key chain that hashed this database's
  patient ids, file paths and DICOM UIDs (an HMAC of a fixed string per key; never a key).
  One row: a second key is refused instead of silently giving one patient two hashes.
- ingest_problems.kind gains 'label_conflict' (the same pixels under different labels in
  one source); ingest_reports gains 'interrupted' (a run that died) and a conflict count.
- audit_findings.labels_differ: an exact duplicate whose copies are labelled differently;
  audit_findings.correlation: how alike a near duplicate's pixels are once aligned.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-02
"""

from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
        CREATE TABLE medsim.pseudonym_keys (
            only_row      boolean PRIMARY KEY DEFAULT true CHECK (only_row),
            fingerprints  text[] NOT NULL,       -- oldest key first; see medsim/sources/keys.py
            created_at    timestamptz NOT NULL DEFAULT now(),
            rotated_at    timestamptz
        )
    """)
    op.execute("ALTER TABLE medsim.ingest_problems DROP CONSTRAINT ingest_problems_kind_check")
    op.execute("ALTER TABLE medsim.ingest_problems ADD CONSTRAINT ingest_problems_kind_check "
               "CHECK (kind IN ('skipped', 'duplicate', 'label_changed', 'label_conflict'))")
    op.execute("ALTER TABLE medsim.ingest_reports DROP CONSTRAINT ingest_reports_status_check")
    op.execute("ALTER TABLE medsim.ingest_reports ADD CONSTRAINT ingest_reports_status_check "
               "CHECK (status IN ('running', 'done', 'refused', 'interrupted'))")
    op.execute("ALTER TABLE medsim.ingest_reports ADD COLUMN label_conflicts integer NOT NULL DEFAULT 0")
    op.execute("ALTER TABLE medsim.audit_findings ADD COLUMN labels_differ boolean, "
               "ADD COLUMN correlation double precision")


def downgrade() -> None:
    op.execute("ALTER TABLE medsim.audit_findings DROP COLUMN labels_differ, DROP COLUMN correlation")
    op.execute("ALTER TABLE medsim.ingest_reports DROP COLUMN label_conflicts")
    op.execute("UPDATE medsim.ingest_reports SET status = 'refused' WHERE status = 'interrupted'")
    op.execute("ALTER TABLE medsim.ingest_reports DROP CONSTRAINT ingest_reports_status_check")
    op.execute("ALTER TABLE medsim.ingest_reports ADD CONSTRAINT ingest_reports_status_check "
               "CHECK (status IN ('running', 'done', 'refused'))")
    op.execute("DELETE FROM medsim.ingest_problems WHERE kind = 'label_conflict'")
    op.execute("ALTER TABLE medsim.ingest_problems DROP CONSTRAINT ingest_problems_kind_check")
    op.execute("ALTER TABLE medsim.ingest_problems ADD CONSTRAINT ingest_problems_kind_check "
               "CHECK (kind IN ('skipped', 'duplicate', 'label_changed'))")
    op.execute("DROP TABLE medsim.pseudonym_keys")
