"""The record of FAISS builds (medsim.index_builds): what each holds, and which one a search
opens. FAISS itself is not imported here: `medsim index list` reads rows only."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from medsim.errors import NotFound
from medsim.queries import Q, rows, scalar
from medsim.search import GALLERY_SPLITS


@dataclass
class DeletionAfter:
    id: int
    kind: str
    deleted_at: datetime


@dataclass
class BuildRow:
    id: int
    model_id: int
    kind: str
    splits: list[str]
    n_rows: int
    path: str
    file_sha256: str | None
    file_bytes: int | None


@dataclass
class BuildLine(BuildRow):
    created_at: datetime


def builds(conn, model_id: int | None = None) -> list[BuildLine]:
    return rows(conn, Q.index_builds, {"model_id": model_id}, as_=BuildLine)


def latest_build(conn, model_id: int, kind_name: str | None = None, splits=GALLERY_SPLITS) -> int:
    """The model's build over these splits to search: of this kind if given; builds that
    still match the gallery first (a stale build of one kind never hides a fresh one of
    another), then an exact one (flat), then the newest."""
    build_id = scalar(conn, Q.latest_index_build, {"model_id": model_id, "splits": list(splits),
                                                   "kind": kind_name})
    if build_id is None:
        held = [r[0] for r in conn.execute(Q.index_build_splits, {"model_id": model_id})]
        default = tuple(splits) == GALLERY_SPLITS
        over = "" if default and not held else f" over {', '.join(splits)}"
        how = f"`medsim index build{'' if default else ' --splits ' + ','.join(splits)}`"
        # builds made before every split was the default hold train, val: say so
        others = f" (its builds hold {' or '.join(held)})" if held else ""
        raise NotFound(f"no {kind_name or 'FAISS'} index{over} built for model {model_id}{others}: run {how}"
                       + ("" if kind_name else " or use --engine pgvector"))
    return build_id
