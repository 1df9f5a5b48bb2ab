"""Archives: folders of images (and DICOM) next to MedMNIST. 16-bit pixels, patients and
studies, metadata, original sizes, how splits were made, and ingest reports.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-28
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
        ALTER TABLE medsim.datasets
            ADD COLUMN source_kind text NOT NULL DEFAULT 'medmnist'
                CHECK (source_kind IN ('medmnist', 'folder', 'dicom')),
            -- how images got their split: {"method": "given"} or the seeded, grouped,
            -- stratified assignment with its fractions and seed
            ADD COLUMN split_method jsonb
    """)
    op.execute("""
        ALTER TABLE medsim.images
            -- 8: one byte per sample; 16: two, little-endian (kept lossless, windowed to 8
            -- bits only at the model's input)
            ADD COLUMN bit_depth smallint NOT NULL DEFAULT 8 CHECK (bit_depth IN (8, 16)),
            -- a keyed hash of the patient id (HMAC-SHA256; the key is configuration, never
            -- stored here), and the study as the source gives it
            ADD COLUMN patient_key text,
            ADD COLUMN study_id text,
            ADD COLUMN metadata jsonb NOT NULL DEFAULT '{}',
            -- where it came from, relative to the archive's root
            ADD COLUMN source_path text,
            -- set when the image was shrunk to the longest side allowed at ingest
            ADD COLUMN original_height integer,
            ADD COLUMN original_width integer
    """)
    op.execute("CREATE INDEX images_dataset_sha256_idx ON medsim.images (dataset_id, sha256)")
    op.execute("CREATE INDEX images_patient_idx ON medsim.images (patient_key) WHERE patient_key IS NOT NULL")
    op.execute("""
        CREATE TABLE medsim.ingest_reports (
            id            integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            dataset_id    integer NOT NULL REFERENCES medsim.datasets (id) ON DELETE CASCADE,
            source        text NOT NULL,
            options       jsonb NOT NULL,
            status        text NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'done', 'refused')),
            added         integer NOT NULL DEFAULT 0,
            duplicates    integer NOT NULL DEFAULT 0,
            skipped       integer NOT NULL DEFAULT 0,
            label_changes integer NOT NULL DEFAULT 0,
            relabelled    integer NOT NULL DEFAULT 0,
            started_at    timestamptz NOT NULL DEFAULT now(),
            finished_at   timestamptz
        )
    """)
    op.execute("""
        CREATE TABLE medsim.ingest_problems (
            report_id  integer NOT NULL REFERENCES medsim.ingest_reports (id) ON DELETE CASCADE,
            path       text NOT NULL,
            kind       text NOT NULL CHECK (kind IN ('skipped', 'duplicate', 'label_changed')),
            reason     text NOT NULL
        )
    """)
    op.execute("CREATE INDEX ingest_problems_report_idx ON medsim.ingest_problems (report_id)")


def downgrade() -> None:
    op.execute("DROP TABLE medsim.ingest_problems")
    op.execute("DROP TABLE medsim.ingest_reports")
    op.execute("DROP INDEX medsim.images_patient_idx")
    op.execute("DROP INDEX medsim.images_dataset_sha256_idx")
    op.execute("""
        ALTER TABLE medsim.images DROP COLUMN bit_depth, DROP COLUMN patient_key, DROP COLUMN study_id,
            DROP COLUMN metadata, DROP COLUMN source_path, DROP COLUMN original_height,
            DROP COLUMN original_width
    """)
    op.execute("ALTER TABLE medsim.datasets DROP COLUMN source_kind, DROP COLUMN split_method")
