"""SQL surface: current_embeddings view, similar_images / search_by_vector, medsim_reader.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27
"""

from alembic import op

from medsim.migrate import apply_sql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_sql(op, "search.sql")


def downgrade() -> None:
    op.execute("DROP FUNCTION medsim.similar_images(bigint, integer, integer, text)")
    op.execute("DROP FUNCTION medsim.search_by_vector(vector, integer, integer, text, bigint)")
    op.execute("DROP VIEW medsim.current_embeddings")
    op.execute("ALTER DEFAULT PRIVILEGES IN SCHEMA medsim REVOKE SELECT ON TABLES FROM medsim_reader")
    op.execute("REVOKE ALL ON ALL TABLES IN SCHEMA medsim FROM medsim_reader")
    op.execute("REVOKE ALL ON ALL FUNCTIONS IN SCHEMA medsim FROM medsim_reader")
    op.execute("REVOKE USAGE ON SCHEMA medsim FROM medsim_reader")
    # The role is cluster-wide: other databases may still grant to it; then it stays.
    op.execute(
        """
        DO $$
        BEGIN
            DROP ROLE IF EXISTS medsim_reader;
        EXCEPTION WHEN dependent_objects_still_exist THEN
            RAISE NOTICE 'medsim_reader still used by other databases; kept';
        END
        $$
        """
    )
