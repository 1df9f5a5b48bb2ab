"""Who may see which images: users, their tokens, per-dataset grants, an access log.

- medsim.users: a person or a program that calls the service. Each has its own
  PostgreSQL role (role_name, NOLOGIN unless made a SQL login), which the service SETs
  for that user's requests, so that row-level security (sql/005_access.sql) decides
  what every query sees: the HTTP service and a person's own SQL session obey one rule.
- medsim.tokens: bearer tokens. Only the SHA-256 of the random part is stored.
- medsim.dataset_grants: which datasets a role may see; dataset_id NULL = every dataset,
  present and future. medsim_reader (the analysts' role before users existed) keeps
  seeing everything, as it did.
- medsim.access_log: every search and every image or thumbnail served, append-only
  (triggers in sql/005_access.sql refuse UPDATE, DELETE and TRUNCATE).

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-02
"""

from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
        CREATE TABLE medsim.users (
            id          integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            name        text NOT NULL UNIQUE CHECK (name ~ '^[a-z][a-z0-9_]{0,39}$'),
            role_name   name NOT NULL UNIQUE,
            created_at  timestamptz NOT NULL DEFAULT now()
        )
    """)
    op.execute("""
        CREATE TABLE medsim.tokens (
            id             integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            user_id        integer NOT NULL REFERENCES medsim.users (id) ON DELETE CASCADE,
            secret_sha256  bytea NOT NULL CHECK (length(secret_sha256) = 32),
            scope          text NOT NULL CHECK (scope IN ('search', 'images', 'admin')),
            created_at     timestamptz NOT NULL DEFAULT now(),
            expires_at     timestamptz,
            revoked_at     timestamptz,
            last_used_at   timestamptz
        )
    """)
    op.execute("CREATE INDEX tokens_user_id ON medsim.tokens (user_id)")
    op.execute("""
        CREATE TABLE medsim.dataset_grants (
            role_name   name NOT NULL,
            dataset_id  integer REFERENCES medsim.datasets (id) ON DELETE CASCADE,  -- NULL: every dataset
            granted_at  timestamptz NOT NULL DEFAULT now(),
            UNIQUE NULLS NOT DISTINCT (role_name, dataset_id)
        )
    """)
    op.execute("INSERT INTO medsim.dataset_grants (role_name, dataset_id) VALUES ('medsim_reader', NULL)")
    op.execute("""
        CREATE TABLE medsim.access_log (
            id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            at              timestamptz NOT NULL DEFAULT clock_timestamp(),
            user_name       text NOT NULL,          -- '(no auth)' when the service ran --no-auth
            token_id        integer,
            client          text,                   -- the client's address as the service saw it
            action          text NOT NULL CHECK (action IN ('search', 'image', 'thumbnail')),
            query_kind      text,                   -- a search's: image_id, upload or vector
            query_image_id  bigint,                 -- a search by a stored image (or an upload on file)
            query_sha256    text,                   -- an upload's bytes
            model_id        integer,
            engine          text,
            image_ids       bigint[] NOT NULL       -- what was shown: a search's results, the image served
        )
    """)
    op.execute("CREATE INDEX access_log_at ON medsim.access_log (at)")
    op.execute("CREATE INDEX access_log_image_ids ON medsim.access_log USING gin (image_ids)")


def downgrade() -> None:
    # policies and triggers belong to sql/, which is dropped before any downgrade
    for t in ("datasets", "images", "embeddings", "embedding_queue", "calibrations", "ingest_reports",
              "ingest_problems", "audits", "audit_findings", "evaluations", "recall_reports", "index_builds",
              "deletions"):
        op.execute(f"ALTER TABLE medsim.{t} DISABLE ROW LEVEL SECURITY")
    op.execute("DROP TABLE medsim.access_log")
    op.execute("DROP TABLE medsim.dataset_grants")
    op.execute("DROP TABLE medsim.tokens")
    op.execute("DROP TABLE medsim.users")
