"""One image path (medsim/images): re-embed every image whose model input changed.

Two rules changed what the network sees of some stored images:
- 16-bit images are read against their container's full scale (value / 257), no longer
  stretched over their own min..max;
- an image stored at a size other than the model's input is resized by the one resize
  (Lanczos, in floating point, antialiased), no longer by torch's bilinear interpolation
  inside the network (the worker and search) or Pillow's bilinear (training).

MedMNIST images at the model's size (8-bit) see exactly what they saw before and keep their
embeddings. The others lose theirs here; the next worker queues them again (its start-up
enqueue), and FAISS builds of those models become stale through the gallery version.
No table changes.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-02
"""

from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
        DELETE FROM medsim.embeddings e
        USING medsim.images i, medsim.models m
        WHERE e.image_id = i.id AND e.model_id = m.id
          AND (i.bit_depth = 16
               OR i.height <> coalesce((m.config ->> 'image_size')::int, 28)
               OR i.width <> coalesce((m.config ->> 'image_size')::int, 28))
    """)


def downgrade() -> None:
    pass  # embeddings are derived data: an older medsim's worker embeds them again its own way
