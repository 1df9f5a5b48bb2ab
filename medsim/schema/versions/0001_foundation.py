"""Foundation: vector extension, medsim schema, datasets and images.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE EXTENSION IF NOT EXISTS vector")
    op.execute("CREATE SCHEMA IF NOT EXISTS medsim")
    op.execute(
        """
        CREATE TABLE medsim.datasets (
            id            integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            flag          text NOT NULL,
            image_size    integer NOT NULL CHECK (image_size > 0),
            is_medmnist   boolean NOT NULL DEFAULT true,
            python_class  text,
            description   text,
            task          text NOT NULL,
            n_channels    smallint NOT NULL CHECK (n_channels IN (1, 3)),
            label_names   jsonb NOT NULL,
            n_samples     jsonb NOT NULL,
            license       text,
            url           text,
            source_file   text,
            source_md5    text NOT NULL,
            official_md5  text,
            md5_official  boolean NOT NULL,
            ingested_at   timestamptz NOT NULL DEFAULT now(),
            UNIQUE (flag, image_size)
        )
        """
    )
    op.execute(
        """
        CREATE TABLE medsim.images (
            id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            dataset_id   integer NOT NULL REFERENCES medsim.datasets (id) ON DELETE CASCADE,
            split        text NOT NULL CHECK (split IN ('train', 'val', 'test')),
            split_index  integer NOT NULL CHECK (split_index >= 0),
            -- one entry for multi-class/binary/ordinal subsets, one 0/1 flag per class
            -- for multi-label ones (ChestMNIST)
            labels       smallint[] NOT NULL,
            height       integer NOT NULL,
            width        integer NOT NULL,
            channels     smallint NOT NULL,
            -- raw uint8 pixels in (height, width, channels) order: lossless and
            -- decodable with numpy alone
            pixels       bytea NOT NULL,
            sha256       bytea NOT NULL,
            created_at   timestamptz NOT NULL DEFAULT now(),
            UNIQUE (dataset_id, split, split_index)
        )
        """
    )
    # Pixels are small (2-150 KB) and barely compressible: keep rows up to ~8 KB inline
    # and never try pglz on them. Halves COPY time for 28 px colour images.
    op.execute("ALTER TABLE medsim.images ALTER COLUMN pixels SET STORAGE EXTERNAL")
    op.execute("ALTER TABLE medsim.images SET (toast_tuple_target = 8160)")
    op.execute("CREATE INDEX images_sha256_idx ON medsim.images (sha256)")


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS medsim.label_name(integer, smallint[])")
    op.execute("DROP TABLE medsim.images")
    op.execute("DROP TABLE medsim.datasets")
    op.execute("DROP SCHEMA medsim")
    op.execute("DROP EXTENSION IF EXISTS vector")
