"""The model registry in Postgres: which models exist, which one is current."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from medsim import model as M
from medsim.queries import Q


@dataclass
class ModelRow:
    id: int
    name: str
    preset: str
    mode: str
    embedding_dim: int
    datasets: list
    config: M.ModelConfig
    is_current: bool

    def load(self, conn, device="cpu") -> M.EmbeddingNet:
        data, sha = conn.execute(Q.model_checkpoint, {"id": self.id}).fetchone()
        return M.load_checkpoint(bytes(data), expected_sha256=sha, device=device)


def get(conn, ref: int | str | None = "current") -> ModelRow:
    """ref: a model id, 'current' or None (current)."""
    if ref is None or ref == "current":
        row = conn.execute(Q.current_model).fetchone()
        if row is None:
            raise LookupError("no current model: train one (medsim train) or pick one with --model ID")
    else:
        try:
            ref = int(ref)
        except ValueError:
            raise LookupError(f"model {ref!r}: expected a model id (see `medsim models`) or 'current'") from None
        row = conn.execute(Q.model_by_id, {"id": ref}).fetchone()
        if row is None:
            raise LookupError(f"no model with id {ref}")
    mid, name, preset, mode, dim, datasets, config, current = row
    return ModelRow(mid, name, preset, mode, dim, datasets, M.ModelConfig.from_dict(config), current)


def register(conn, net: M.EmbeddingNet, *, mode: str, datasets: list, train_config: dict,
             name: str | None = None, best_epoch=None, best_val_loss=None, train_seconds=None) -> int:
    """Store a model (config + checkpoint bytes + sha256) and return its id."""
    cfg = net.cfg
    blob, sha = M.save_checkpoint(net, extra={"train_config": train_config, "flags": datasets})
    return conn.execute(Q.insert_model, {
        "name": name or f"{cfg.preset}-{mode}", "preset": cfg.preset, "mode": mode,
        "config": json.dumps(asdict(cfg)), "train_config": json.dumps(train_config),
        "datasets": list(datasets), "embedding_dim": cfg.embedding_dim, "checkpoint": blob,
        "sha256": sha, "best_epoch": best_epoch, "best_val_loss": best_val_loss,
        "train_seconds": train_seconds,
    }).fetchone()[0]


def set_current(conn, model_id: int) -> None:
    """Make model_id the current model, atomically (one transaction; the partial unique
    index guarantees at most one current row). Its images become pending for it."""
    with conn.transaction():
        if conn.execute(Q.model_by_id, {"id": model_id}).fetchone() is None:
            raise LookupError(f"no model with id {model_id}")
        conn.execute(Q.unset_current)
        conn.execute(Q.set_current, {"id": model_id})
        enqueue(conn, model_id)


def enqueue(conn, model_id: int) -> int:
    """Queue every image model_id has not embedded yet (idempotent) -> rows added.

    Holds the model's queue lock exclusively so no worker batch is in flight while the
    "not embedded yet" set is computed (see Q.lock_queue_shared for the race it closes).
    Inside an outer transaction this is a savepoint: the lock is then held until the
    outer transaction ends. The outer transaction must be READ COMMITTED (the default).
    """
    with conn.transaction():
        conn.execute(Q.lock_queue_exclusive, {"model_id": model_id})
        return conn.execute(Q.enqueue_model, {"model_id": model_id}).rowcount


def list_models(conn) -> list[tuple]:
    return conn.execute(Q.list_models).fetchall()
