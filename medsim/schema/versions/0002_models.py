"""Model registry: trained models with their checkpoints, per-epoch history, evaluations.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE medsim.models (
            id                 integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            name               text NOT NULL,
            preset             text NOT NULL,
            mode               text NOT NULL CHECK (mode IN ('dataset', 'label')),
            config             jsonb NOT NULL,       -- ModelConfig: rebuilds the network
            train_config       jsonb NOT NULL,       -- TrainConfig: how it was trained
            datasets           text[] NOT NULL,      -- MedMNIST flags it was trained on
            embedding_dim      integer NOT NULL CHECK (embedding_dim > 0),
            checkpoint         bytea NOT NULL,       -- torch.save() bytes, config inside
            checkpoint_sha256  text NOT NULL,
            best_epoch         integer,
            best_val_loss      double precision,
            train_seconds      double precision,
            is_current         boolean NOT NULL DEFAULT false,
            created_at         timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    # At most one current model; switching is one UPDATE in one transaction.
    op.execute("CREATE UNIQUE INDEX models_one_current ON medsim.models (is_current) WHERE is_current")
    op.execute(
        """
        CREATE TABLE medsim.training_epochs (
            model_id    integer NOT NULL REFERENCES medsim.models (id) ON DELETE CASCADE,
            epoch       integer NOT NULL,
            train_loss  double precision NOT NULL,
            train_acc   double precision NOT NULL,
            val_loss    double precision NOT NULL,
            val_acc     double precision NOT NULL,
            val_auc     double precision NOT NULL,
            seconds     double precision NOT NULL,
            PRIMARY KEY (model_id, epoch)
        )
        """
    )
    op.execute(
        """
        CREATE TABLE medsim.evaluations (
            id          integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            model_id    integer NOT NULL REFERENCES medsim.models (id) ON DELETE CASCADE,
            seed        integer NOT NULL,
            results     jsonb NOT NULL,
            created_at  timestamptz NOT NULL DEFAULT now()
        )
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE medsim.evaluations")
    op.execute("DROP TABLE medsim.training_epochs")
    op.execute("DROP TABLE medsim.models")
