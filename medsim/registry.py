"""The model registry in Postgres: which models exist, which one is current.

Torch is imported only to load or save a network: listing models, resolving
``--model current`` and reading a config cost no torch import.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime

from medsim import queue
from medsim.errors import NotFound
from medsim.queries import Q, one, rows, scalar


@dataclass
class ModelRow:
    id: int
    name: str
    preset: str
    mode: str
    embedding_dim: int
    datasets: list
    config: dict  # the ModelConfig as JSON (the checkpoint carries it too)
    is_current: bool
    candidate: bool

    def load(self, conn, device="cpu"):
        """The network, rebuilt from the checkpoint bytes alone (imports torch); an imported
        encoder as a torch module over its ONNX Runtime session."""
        from medsim.model import network

        ck = self.checkpoint(conn)
        if self.config.get("arch") == "onnx":
            from medsim.model import imported
            from medsim.model.config import ModelConfig

            rt = imported.load(bytes(ck.checkpoint), ModelConfig.from_dict(self.config), ck.checkpoint_sha256)
            return network.ImportedNet(rt)
        return network.load_checkpoint(bytes(ck.checkpoint), expected_sha256=ck.checkpoint_sha256,
                                       device=device)

    def checkpoint(self, conn) -> Checkpoint:
        return one(conn, Q.model_checkpoint, {"id": self.id}, as_=Checkpoint)

    def checkpoint_sha256(self, conn) -> str:
        return scalar(conn, Q.model_checkpoint_sha256, {"id": self.id})


@dataclass
class Checkpoint:
    checkpoint: bytes
    checkpoint_sha256: str


@dataclass
class ModelInfo(ModelRow):
    """A line of `medsim models`: the registry row and how training went."""

    best_epoch: int | None
    best_val_loss: float | None
    train_seconds: float | None
    created_at: datetime


@dataclass
class Epoch:
    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float


def model_id(ref: int | str | None) -> int | None:
    """--model as given -> an id, or None for 'current'."""
    if ref is None or ref == "current":
        return None
    if isinstance(ref, int) and 0 < ref < 2**31:
        return ref
    # ASCII digits that fit the id's integer column: int() also reads '١٢' (other scripts'
    # digits) and a number past 2**31 reached the database as an error
    if isinstance(ref, str) and ref.isascii() and ref.isdigit() and 0 < int(ref) < 2**31:
        return int(ref)
    raise NotFound(f"model {ref!r}: expected a model id (see `medsim models`) or 'current'")


def get(conn, ref: int | str | None = "current") -> ModelRow:
    """ref: a model id, 'current' or None (current)."""
    mid = model_id(ref)
    if mid is None:
        row = one(conn, Q.current_model, as_=ModelRow)
        if row is None:
            raise NotFound("no current model: train one (medsim train) or pick one with --model ID")
        return row
    row = one(conn, Q.model_by_id, {"id": mid}, as_=ModelRow)
    if row is None:
        raise NotFound(f"no model with id {mid}")
    return row


def register(conn, net, *, mode: str, datasets: list, train_config: dict,
             name: str | None = None, best_epoch=None, best_val_loss=None, train_seconds=None,
             candidate: bool = False, promote_when_ready: bool = False) -> int:
    """Store a model (config + checkpoint bytes + sha256) and return its id. A candidate
    is embedded by the workers after the current model's backlog and made current by
    search/promotion.py once its gallery is complete; searches keep the current model."""
    from medsim.model import network

    blob, sha = network.save_checkpoint(net, extra={"train_config": train_config, "flags": datasets})
    return register_bytes(conn, net.cfg, blob, sha, name=name or f"{net.cfg.preset}-{mode}", mode=mode,
                          datasets=datasets, train_config=train_config, candidate=candidate,
                          promote_when_ready=promote_when_ready, train_seconds=train_seconds,
                          best_epoch=best_epoch, best_val_loss=best_val_loss)


def register_bytes(conn, cfg, blob: bytes, sha: str, *, name: str, mode: str, datasets: list,
                   train_config: dict, candidate: bool, promote_when_ready: bool = False,
                   train_seconds=None, best_epoch=None, best_val_loss=None) -> int:
    """Store a model's config and checkpoint bytes -> its id: a torch checkpoint (register),
    or an imported ONNX encoder (medsim/model/imported.py's container: the file's bytes,
    and a head if `medsim train --on` trained one)."""
    return scalar(conn, Q.insert_model, {
        "name": name, "preset": cfg.preset, "mode": mode, "config": json.dumps(asdict(cfg)),
        "train_config": json.dumps(train_config), "datasets": list(datasets), "embedding_dim": cfg.embedding_dim,
        "checkpoint": blob, "sha256": sha, "best_epoch": best_epoch, "best_val_loss": best_val_loss,
        "train_seconds": train_seconds, "candidate": candidate, "promote_when_ready": promote_when_ready,
    })


def register_and_place(conn, register, *, current: bool | None = None, candidate: bool = True,
                       promote_when_ready: bool = False, log=print) -> tuple[int, bool]:
    """register(candidate, promote_when_ready) -> a new model id, in one transaction with its
    place -> (the id, whether it is current). current None: current when there is no current
    model, else a candidate (when `candidate`) that the workers embed after the current
    model's backlog and search/promotion.py makes current; True: current at once; False:
    not current. The registry is locked first, so two registrations at once cannot both
    take "no current model" for theirs (three imports at once left one model neither
    current nor a candidate)."""
    with conn.transaction():
        conn.execute(Q.lock_model_registry)
        make_current = conn.execute(Q.current_model).fetchone() is None if current is None else current
        as_candidate = candidate and not make_current
        mid = register(as_candidate, as_candidate and promote_when_ready)
        if make_current:
            set_current(conn, mid)
        elif as_candidate:
            queue.enqueue(conn, mid)
    if as_candidate:
        log(f"model {mid} is a candidate: searches keep the current model while workers embed its gallery; "
            + ("it becomes current as soon as that is complete" if promote_when_ready else
               f"`medsim models promote {mid}` makes it current once that is complete"))
    return mid, make_current


def set_current(conn, model_id: int) -> None:
    """Make model_id the current model, atomically (one transaction, or a savepoint of the
    caller's; the partial unique index guarantees at most one current row). Its images
    become pending for it."""
    with conn.transaction():
        if one(conn, Q.model_by_id, {"id": model_id}, as_=ModelRow) is None:
            raise NotFound(f"no model with id {model_id}")
        conn.execute(Q.unset_current)
        conn.execute(Q.set_current, {"id": model_id})
        queue.enqueue(conn, model_id)


def candidates(conn) -> list[int]:
    """Candidate model ids, oldest first (the order workers embed them in)."""
    return [r[0] for r in conn.execute(Q.candidate_models)]


def promote_when_ready(conn, model_id: int) -> bool:
    """A candidate registered with --promote-when-ready."""
    return bool(scalar(conn, Q.promote_when_ready, {"id": model_id}))


def in_line(conn) -> list[int]:
    """What workers embed for: the current model first, then the candidates, oldest first."""
    return [r[0] for r in conn.execute(Q.models_in_line)]


def list_models(conn) -> list[ModelInfo]:
    return rows(conn, Q.list_models, as_=ModelInfo)


def epoch_history(conn, model_id: int) -> list[dict]:
    return [asdict(e) for e in rows(conn, Q.epoch_history, {"model_id": model_id}, as_=Epoch)]


def _as_stored(d: dict) -> dict:
    return json.loads(json.dumps(d))  # tuples become the lists the jsonb column holds


def reusable(conn, tcfg) -> int | None:
    """Latest model trained with this recipe: the same subsets and every field of the
    TrainConfig but the device (where it ran does not change what it is). A field the
    stored recipe lacks was added to TrainConfig after that training, with a default that
    keeps the old behaviour, so it matches that default: `medsim demo` had retrained an
    identical model because the recipe gained pretrain_epochs (0)."""
    recipe = _as_stored({k: v for k, v in asdict(tcfg).items() if k not in ("device", "flags")})
    defaults = _as_stored(asdict(type(tcfg)()))
    for mid, stored in conn.execute(Q.models_of_kind, {"preset": tcfg.preset, "mode": tcfg.mode,
                                                       "flags": sorted(tcfg.flags)}):
        if all(stored.get(k, defaults.get(k)) == v for k, v in recipe.items()):
            return mid
    return None
