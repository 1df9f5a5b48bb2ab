"""SQL surface: current_embeddings view, similar_images / search_by_vector, medsim_reader.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # current_embeddings, similar_images, search_by_vector and the medsim_reader role
    # live in sql/004_search.sql, applied once the database reaches head
    pass


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS medsim.similar_images(bigint, integer, integer, text)")
    op.execute("DROP FUNCTION IF EXISTS medsim.search_by_vector(vector, integer, integer, text, bigint)")
    op.execute("DROP VIEW IF EXISTS medsim.current_embeddings")
    # The role is cluster-wide: it may be gone already (0006's downgrade), and other
    # databases may still grant to it; then it stays.
    op.execute(
        """
        DO $$
        BEGIN
            IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'medsim_reader') THEN
                ALTER DEFAULT PRIVILEGES IN SCHEMA medsim REVOKE SELECT ON TABLES FROM medsim_reader;
                REVOKE ALL ON ALL TABLES IN SCHEMA medsim FROM medsim_reader;
                REVOKE ALL ON ALL FUNCTIONS IN SCHEMA medsim FROM medsim_reader;
                REVOKE USAGE ON SCHEMA medsim FROM medsim_reader;
                BEGIN
                    DROP ROLE medsim_reader;
                EXCEPTION WHEN dependent_objects_still_exist THEN
                    RAISE NOTICE 'medsim_reader still used by other databases; kept';
                END;
            END IF;
        END
        $$
        """
    )
