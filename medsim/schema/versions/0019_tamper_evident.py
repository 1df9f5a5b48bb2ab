"""Access control that holds against an attacker: a hash-chained access log, users that
can be disabled, the forwarded chain apart from the peer.

- access_log.chain_seq / prev_hash / row_hash: each row carries the SHA-256 of its
  content and of the row before it (sql/007_access_log.sql computes them in a trigger and
  chains the rows already there once); `medsim access-log verify` recomputes the chain.
- medsim.access_log_head: the chain's end, one row. The trigger locks it (a row lock,
  which no reader role can take, unlike an advisory lock) so rows chain one at a time.
- access_log.client is the connected peer; access_log.forwarded is the X-Forwarded-For
  chain as received, recorded apart (and only read for the client's address when the
  peer is a trusted proxy: medsim serve --forwarded-allow-ips).
- access_log.detail: what a purge removed (its range and the last removed row's hash),
  so that the chain stays verifiable across a retention purge; action 'purge' and
  'user' (a user deleted or disabled) join the CHECK.
- users.disabled_at: a disabled user's tokens are refused and its SQL login closed.

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-08
"""

from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None

ACTIONS = ("search", "image", "thumbnail", "preview", "embedding", "browse", "export", "upload_deleted", "explain",
           "original")


def _actions(actions: tuple) -> None:
    op.execute("ALTER TABLE medsim.access_log DROP CONSTRAINT access_log_action_check")
    op.execute(f"ALTER TABLE medsim.access_log ADD CONSTRAINT access_log_action_check "
               f"CHECK (action IN ({', '.join(repr(a) for a in actions)}))")


def upgrade() -> None:
    # NULL until sql/007_access_log.sql chains the rows already there (once)
    op.execute("""
        ALTER TABLE medsim.access_log
            ADD COLUMN forwarded text,
            ADD COLUMN detail    jsonb,
            ADD COLUMN chain_seq bigint UNIQUE,
            ADD COLUMN prev_hash bytea,
            ADD COLUMN row_hash  bytea
    """)
    _actions((*ACTIONS, "purge", "user"))
    op.execute("""
        CREATE TABLE medsim.access_log_head (
            only_row   boolean PRIMARY KEY DEFAULT true CHECK (only_row),
            chain_seq  bigint NOT NULL,
            row_hash   bytea NOT NULL
        )
    """)
    op.execute("ALTER TABLE medsim.users ADD COLUMN disabled_at timestamptz")


def downgrade() -> None:
    op.execute("ALTER TABLE medsim.users DROP COLUMN disabled_at")
    op.execute("DROP TABLE medsim.access_log_head")
    # the log keeps its rows: a purge or user record becomes nothing older revisions knew,
    # so they are dropped with the columns that explain them (the chain goes too)
    op.execute("ALTER TABLE medsim.access_log DISABLE TRIGGER USER")
    op.execute("DELETE FROM medsim.access_log WHERE action IN ('purge', 'user')")
    op.execute("ALTER TABLE medsim.access_log ENABLE TRIGGER USER")
    _actions(ACTIONS)
    op.execute("ALTER TABLE medsim.access_log DROP COLUMN forwarded, DROP COLUMN detail, DROP COLUMN chain_seq, "
               "DROP COLUMN prev_hash, DROP COLUMN row_hash")
