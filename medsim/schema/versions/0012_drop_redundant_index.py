"""Drop images (dataset_id, sha256): no query filters on that pair.

Dataset-scoped reads use the unique (dataset_id, split, split_index) index, and lookups by
content use images_sha256_idx. The extra B-tree of random 32-byte keys was a quarter of
the ingest's server time: a 500,000-image COPY went from 49,691 to 62,532 images/s
without it (bench/bench_scale.py's archive, 2 cores).

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-28
"""

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("DROP INDEX IF EXISTS medsim.images_dataset_sha256_idx")


def downgrade() -> None:
    op.execute("CREATE INDEX images_dataset_sha256_idx ON medsim.images (dataset_id, sha256)")
