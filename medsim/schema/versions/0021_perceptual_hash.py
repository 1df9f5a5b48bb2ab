"""A picture's identity at any size: a perceptual hash per image.

- images.phash: the image's 64-bit pHash (medsim/images/perceptual.py), computed at ingest
  for every source; NULL for rows stored before this revision until `medsim migrate`
  computes theirs (a revision cannot: the hash needs the one image path, which the schema
  layer does not import). A NULL hash is never a match: such a row is recognised only by
  its exact pixels, as before.
- images_phash (phash, id): a thumbnail query compares its hash with every stored one
  (search/pipeline.py), an index-only pass.
- Four expression indexes, one per 16-bit band of the hash: two hashes within 3 bits of
  each other agree exactly on at least one band, so a search finds the stored images near
  a query's hash by four index lookups (multi-index hashing), then counts bits on those
  few rows only, whatever the gallery's size.

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-08
"""

from alembic import op

revision = "0021"
down_revision = "0020"
branch_labels = None
depends_on = None

# written exactly as queries.sql's images_by_phash writes them: an expression index serves
# only the very same expression ("phash >> 0" would not serve "phash")
BANDS = ("(phash >> 48) & 65535", "(phash >> 32) & 65535", "(phash >> 16) & 65535", "phash & 65535")


def upgrade() -> None:
    op.execute("ALTER TABLE medsim.images ADD COLUMN phash bigint")
    for n, band in enumerate(BANDS):
        op.execute(f"CREATE INDEX images_phash_band{n} ON medsim.images (({band}))")
    # the pass a thumbnail query makes over every hash reads this index alone, not the table
    op.execute("CREATE INDEX images_phash ON medsim.images (phash) INCLUDE (id)")


def downgrade() -> None:
    op.execute("DROP INDEX medsim.images_phash")
    for n in range(len(BANDS)):
        op.execute(f"DROP INDEX medsim.images_phash_band{n}")
    op.execute("ALTER TABLE medsim.images DROP COLUMN phash")
