"""Which datasets an evaluation covers, and why any other is left out.

A model is evaluated on any labelled dataset on file, whether or not it was trained on it:
an archive ingested after training gets its retrieval figures (its test queries against
its own train split) and its calibration (fitted on its val split) like the training
subsets do, so its searches carry P(right). By default: the datasets the model was
trained on and every dataset it has embeddings for. A dataset that cannot be evaluated
is one sentence saying why, and the others still are.
"""

from __future__ import annotations

from dataclasses import dataclass

from medsim import queue
from medsim.queries import Q, rows
from medsim.training.calibration import K_FIT


@dataclass
class Readiness:
    dataset: str
    train: int
    val: int
    test: int
    labels: int  # distinct label vectors on file


def why_not(r: Readiness | None, flag: str) -> str | None:
    """One sentence saying why `flag` cannot be evaluated, or None when it can."""
    if r is None:
        return f"{flag} is not evaluated: no dataset of that name is on file"
    if r.labels == 0:
        return f"{flag} is not evaluated: its images carry no labels, so there is no diagnosis to retrieve or calibrate"
    missing = []
    if r.test == 0:
        missing.append("no test queries (no image in its test split)")
    elif r.test < 2:
        missing.append(f"{r.test} test query, where the calibration's error is measured on at least 2")
    if r.val == 0:
        missing.append("no val split to fit the calibration on")
    elif r.val < 2:
        missing.append(f"{r.val} val image, where the calibration is fitted on at least 2")
    if r.train < K_FIT:
        missing.append(f"{r.train} train images to search, fewer than the {K_FIT} neighbours the calibration "
                       f"is fitted on")
    return f"{flag} is not evaluated: it has {' and '.join(missing)}" if missing else None


def default_datasets(conn, model) -> list[str]:
    """The model's training datasets, then every dataset it has embeddings for."""
    embedded = [s.dataset for s in queue.status(conn, model.id) if s.embedded > 0]
    return list(dict.fromkeys([*(model.datasets or []), *sorted(embedded)]))


def choose(conn, model, datasets=None, image_size: int = 28) -> tuple[list[str], dict[str, str]]:
    """-> (the datasets to evaluate, {dataset left out: the sentence why})."""
    asked = list(dict.fromkeys(datasets)) if datasets else default_datasets(conn, model)
    found = {r.dataset: r for r in rows(conn, Q.evaluable_datasets, {"flags": asked, "size": image_size},
                                        as_=Readiness)}
    ok, left_out = [], {}
    for flag in asked:
        why = why_not(found.get(flag), flag)
        if why is None:
            ok.append(flag)
        else:
            left_out[flag] = why
    return ok, left_out
