"""Which model a worker embeds for, when it runs for "current" (the default): the current
model's backlog first, then each candidate's, oldest first, so a retrain never slows the
gallery searches use; and, for a candidate whose gallery it completes, the promotion
(--promote-when-ready, or the candidate's own flag from `medsim train --promote-when-ready`)."""

from __future__ import annotations

import logging

from medsim import queue, registry
from medsim.errors import NotFound
from medsim.search import promotion
from medsim.worker import policy

log = logging.getLogger("medsim.worker")


def next_in_line(worker) -> bool:
    """Called when the model at hand has nothing due -> True when the worker switched to
    another model with work (its queue is then the one drained)."""
    if worker.cfg.model != "current":
        return False
    conn, at_hand = worker.conns[0], worker.model_row.id
    _maybe_promote(worker, conn, at_hand)
    line = registry.in_line(conn)
    for mid in line:
        if mid == at_hand:
            continue
        if queue.enqueue(conn, mid) or queue.pending_count(conn, mid):
            policy.after_drain(conn, at_hand, worker.model_row.embedding_dim, worker.summary.embedded > 0,
                               worker.cfg.build_index)
            log.info("model %s has nothing pending; embedding for %s model %s", at_hand,
                     "the current" if mid == line[0] else "candidate", mid)
            worker.load_model(mid)
            worker.summary.models.append(mid)
            return True
        _maybe_promote(worker, conn, mid)
    line = registry.in_line(conn)
    if line and line[0] != at_hand:
        worker.load_model(line[0])  # back to the current model, nothing being due anywhere
    return False


def follow_current(worker) -> None:
    """After an idle wait: a worker for "current" follows a change of the current model
    (a promotion, `medsim models --set-current`), unless it is on a candidate's backlog."""
    if worker.cfg.model != "current":
        return
    try:
        current = registry.get(worker.conns[0], "current").id
    except NotFound:  # no current model for now: keep serving the one we have
        return
    if current != worker.model_row.id and not worker.model_row.candidate:
        log.info("current model changed to %s", current)
        worker.load_model()


def _maybe_promote(worker, conn, model_id: int) -> None:
    wanted = worker.cfg.promote_when_ready or registry.promote_when_ready(conn, model_id)
    if not wanted or queue.pending_count(conn, model_id) or not promotion.ready_to_promote(conn, model_id):
        return
    p = promotion.promote(conn, model_id, by="(worker --promote-when-ready)", say=log.info)
    log.info("promoted model %s (its gallery is complete); it replaced model %s", p.model_id, p.previous_id)
    worker.summary.promoted.append(p.model_id)
