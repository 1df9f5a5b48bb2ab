"""A new model without downtime (blue/green, as Elasticsearch swaps an alias).

`medsim train` registers a *candidate* while another model is current; workers embed the
current model's backlog first, then the candidates' (worker/lanes of work: worker/models.py);
searches keep using the current model throughout. promote() makes a candidate current:

    its gallery complete (every image embedded; --force says what is missing instead)
    -> its partial HNSW index built, and a FAISS build of every kind the current model has
    -> one transaction: both model rows locked, completeness checked again, the switch,
       a row in medsim.model_promotions (what it replaced)

Searches read the current model per request, so every door (CLI, SQL, a running
`medsim serve`) follows the switch at its commit: before it they answer from the old
model, after it from the new one, never from a half-embedded one. rollback() promotes
the model the last promotion replaced, with the same checks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from medsim import queue, registry
from medsim.errors import BadArgument, DataRefused, NotFound, StaleIndex
from medsim.queries import Q
from medsim.search import faiss_index, pgvector_hnsw

log = logging.getLogger("medsim.promotion")


@dataclass
class Promotion:
    model_id: int
    previous_id: int | None
    kind: str
    missing: int  # gallery images without the model's embedding (only when forced)
    total: int
    faiss_builds: list  # build ids made for it


def missing(conn, model_id: int) -> tuple[int, int]:
    """(images without the model's embedding, images on file)."""
    return tuple(conn.execute(Q.gallery_missing, {"model_id": model_id}).fetchone())


def _target(conn, ref) -> registry.ModelRow:
    if ref is None:
        found = registry.candidates(conn)
        if not found:
            raise NotFound("no candidate model to promote (`medsim train` registers one; `medsim models` lists them)")
        ref = found[-1]  # the newest
    return registry.get(conn, ref)


def _prepare_indexes(conn, model: registry.ModelRow, current_id: int | None, say) -> list[int]:
    """The candidate's HNSW index, and a FAISS build of each kind the current model has,
    before the switch: the first searches after it find them ready."""
    if pgvector_hnsw.ensure(conn, model.id, model.embedding_dim):
        say(f"built HNSW index {pgvector_hnsw.index_name(model.id)}")
    made = []
    if current_id is None:
        return made
    for kind, splits, path in conn.execute(Q.model_build_kinds, {"model_id": current_id}).fetchall():
        try:
            faiss_index.load_build(conn, faiss_index.latest_build(conn, model.id, kind, splits=tuple(splits)),
                                   model_ref=model.id)
            continue  # a fresh build of this kind is there already
        except (NotFound, StaleIndex, DataRefused):  # none, or stale: build one
            pass
        b = faiss_index.build(conn, model.id, kind, splits=tuple(splits), index_dir=Path(path).parent)
        made.append(b.meta["build_id"])
        say(f"built FAISS {kind} index over {', '.join(splits)} for model {model.id} ({b.meta['n_rows']:,} vectors)")
    return made


def promote(conn, ref=None, force: bool = False, by: str | None = None, kind: str = "promote",
            say=print) -> Promotion:
    """Make a candidate (or any model: ref) current, once its gallery is complete."""
    model = _target(conn, ref)
    current = conn.execute(Q.current_model).fetchone()
    current_id = current[0] if current else None
    if current_id == model.id:
        raise BadArgument(f"model {model.id} is current already")
    n_missing, total = missing(conn, model.id)
    if n_missing and not force:
        queue.enqueue(conn, model.id)  # a retired model (a rollback) waits for the workers again
        raise DataRefused(f"model {model.id}'s gallery is not complete: {n_missing:,} of {total:,} images have no "
                          f"embedding for it yet; run `medsim worker` and try again, or add --force to make it "
                          f"current now (searches would not see those images until they are embedded)")
    builds = _prepare_indexes(conn, model, current_id, say)
    with conn.transaction():
        locked = conn.execute(Q.lock_models_for_promotion, {"id": model.id}).fetchall()
        previous = next((r[0] for r in locked if r[1] and r[0] != model.id), None)
        if previous != current_id:
            raise DataRefused("the current model changed while this promotion prepared; run it again")
        n_missing, total = missing(conn, model.id)  # images ingested since: the workers embed them
        if n_missing and not force:
            raise DataRefused(f"model {model.id}'s gallery lost completeness while its indexes were built "
                              f"({n_missing:,} new images); run `medsim worker` and try again")
        conn.execute(Q.unset_current)
        conn.execute(Q.make_current, {"id": model.id})
        conn.execute(Q.insert_promotion, {"model_id": model.id, "previous_id": previous, "kind": kind,
                                          "missing": n_missing, "by": by})
        if n_missing:
            queue.enqueue(conn, model.id)
    return Promotion(model.id, previous, kind, n_missing, total, builds)


def rollback(conn, force: bool = False, by: str | None = None, say=print) -> Promotion:
    """Return to the model the last promotion (or rollback) replaced."""
    last = conn.execute(Q.last_promotion).fetchone()
    if last is None or last[1] is None:
        raise NotFound("nothing to roll back to: no promotion replaced a model yet (`medsim models` lists them)")
    return promote(conn, last[1], force=force, by=by, kind="rollback", say=say)


def ready_to_promote(conn, model_id: int) -> bool:
    """A candidate whose gallery is complete (a worker's --promote-when-ready check)."""
    row = registry.get(conn, model_id)
    return row.candidate and missing(conn, model_id)[0] == 0
