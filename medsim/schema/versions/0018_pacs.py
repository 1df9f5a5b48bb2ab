"""A PACS as a source: archives kept in sync over DICOMweb, pixels by reference.

- medsim.pacs_sources: one row per (dataset, DICOMweb URL): whether the server is an
  Orthanc, the viewer link template, and the incremental cursor (Orthanc's /changes
  sequence, or the last study date seen). Credentials are never stored: they come from the
  environment at every sync.
- medsim.pacs_instances: every instance a sync has settled, one row per frame: the UIDs in
  clear (the way back to the PACS: fetching the original and the viewer link need them) and
  the image it became, or why it was refused. Unlike images.metadata, where UIDs are keyed
  hashes, this table is closed to medsim_reader (004_search.sql); only the owner and the
  service read it. A deleted image keeps its row (image_id becomes NULL), so a sync does
  not fetch a withdrawn patient's instance again.
- medsim.source_files: what an ingest of a folder settled of each file (its size, mtime,
  sha256 of its bytes, and what became of it), so that a re-run skips unchanged files
  before decoding a pixel (a re-run that added nothing decoded every file again: 278 s for
  76 files with a 120-frame JPEG cine). The path is keyed, as images.source_path is.
- images.source_path gets an index for the sync's own lookups, and datasets.source_kind
  admits 'pacs'. The access log records fetches of originals (action 'original').

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-02
"""

from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None

ACTIONS = ("search", "image", "thumbnail", "preview", "embedding", "browse", "export", "upload_deleted", "explain")


def _actions(actions: tuple) -> None:
    op.execute("ALTER TABLE medsim.access_log DROP CONSTRAINT access_log_action_check")
    op.execute(f"ALTER TABLE medsim.access_log ADD CONSTRAINT access_log_action_check "
               f"CHECK (action IN ({', '.join(repr(a) for a in actions)}))")


def _kinds(kinds: tuple) -> None:
    op.execute("ALTER TABLE medsim.datasets DROP CONSTRAINT IF EXISTS datasets_source_kind_check")
    op.execute(f"ALTER TABLE medsim.datasets ADD CONSTRAINT datasets_source_kind_check "
               f"CHECK (source_kind IN ({', '.join(repr(k) for k in kinds)}))")


def upgrade() -> None:
    _kinds(("medmnist", "folder", "dicom", "pacs"))
    _actions((*ACTIONS, "original"))
    op.execute("""
        CREATE TABLE medsim.pacs_sources (
            id          integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            dataset_id  integer NOT NULL REFERENCES medsim.datasets (id) ON DELETE CASCADE,
            url         text NOT NULL,                 -- the DICOMweb root, without credentials
            is_orthanc  boolean NOT NULL DEFAULT false,
            viewer      text,                          -- link template: {study}, {series}, {sop}, ...
            cursor      jsonb NOT NULL DEFAULT '{}',   -- {"changes": seq} or {"study_date": "YYYYMMDD"}
            created_at  timestamptz NOT NULL DEFAULT now(),
            synced_at   timestamptz,
            UNIQUE (dataset_id, url)
        )
    """)
    op.execute("""
        CREATE TABLE medsim.pacs_instances (
            source_id   integer NOT NULL REFERENCES medsim.pacs_sources (id) ON DELETE CASCADE,
            study_uid   text NOT NULL,
            series_uid  text NOT NULL,
            sop_uid     text NOT NULL,
            frame       integer NOT NULL DEFAULT 0,
            image_id    bigint REFERENCES medsim.images (id) ON DELETE SET NULL,
            outcome     text NOT NULL CHECK (outcome IN ('stored', 'unchanged', 'duplicate', 'refused')),
            reason      text,
            orthanc_study text,                        -- Orthanc's own study id, for its explorer's links
            synced_at   timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (source_id, sop_uid, frame)
        )
    """)
    op.execute("CREATE INDEX pacs_instances_image ON medsim.pacs_instances (image_id) WHERE image_id IS NOT NULL")
    op.execute("CREATE INDEX pacs_instances_study ON medsim.pacs_instances (source_id, study_uid)")
    op.execute("""
        CREATE TABLE medsim.source_files (
            dataset_id  integer NOT NULL REFERENCES medsim.datasets (id) ON DELETE CASCADE,
            path        text NOT NULL,          -- keyed, relative to the archive (sources/keys.py)
            size        bigint NOT NULL,
            mtime_ns    bigint NOT NULL,
            sha256      bytea NOT NULL,         -- of the file's bytes
            listing     text NOT NULL,          -- a digest of what the source says of it (labels, split, ...)
            outcome     text NOT NULL CHECK (outcome IN ('stored', 'refused')),
            reason      text,
            checked_at  timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (dataset_id, path)
        )
    """)
    op.execute("CREATE INDEX images_source_path ON medsim.images (dataset_id, source_path) "
               "WHERE source_path IS NOT NULL")


def downgrade() -> None:
    op.execute("DROP INDEX medsim.images_source_path")
    op.execute("DROP TABLE medsim.source_files")
    op.execute("DROP TABLE medsim.pacs_instances")
    op.execute("DROP TABLE medsim.pacs_sources")
    # an audit log keeps its rows: a fetched original becomes the nearest old action
    op.execute("UPDATE medsim.access_log SET action = 'image' WHERE action = 'original'")
    _actions(ACTIONS)
    op.execute("UPDATE medsim.datasets SET source_kind = 'dicom' WHERE source_kind = 'pacs'")
    _kinds(("medmnist", "folder", "dicom"))
