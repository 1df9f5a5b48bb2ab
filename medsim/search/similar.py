"""Similar-image search for people: by stored image id or by an image file.

The query is embedded the way training inputs were (the model's input size, grey
repeated to three channels, scaled to [-1, 1]); the gallery is train + val. A query that is itself in
the gallery (same id, or byte-identical pixels) is reported as such and left out of
its own neighbours.

Cost follows need: a stored image that is already embedded is searched with its
stored vector, so search by id through pgvector imports neither torch nor FAISS. The
network is loaded only for an image file or an image not embedded yet, and a FAISS
index is loaded and checked for freshness once per call, not once per query.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from psycopg.types.json import Jsonb

from medsim import registry
from medsim.errors import BadArgument, NotFound
from medsim.pixels import StoredRow, load_image_file
from medsim.queries import Q, one, rows, scalar
from medsim.search import ENGINES, GALLERY_SPLITS, MAX_K


@dataclass
class Query:
    label: str  # how to show it: "image 123" or the file name
    pixels: np.ndarray  # (H, W, 3) uint8
    vector: np.ndarray  # (dim,) float32
    image_id: int | None = None
    dataset: str | None = None
    label_name: str | None = None
    in_gallery: list = field(default_factory=list)  # gallery ids holding this very image
    patient_key: str | None = None  # the query's patient, excluded from its neighbours by default
    vote: dict | None = None  # the neighbours' label vote and its calibrated confidence


@dataclass
class Hit:
    image_id: int
    dataset: str
    split: str
    label_name: str
    distance: float
    patient_key: str | None = None
    study_id: str | None = None
    p_same: float | None = None  # calibrated P(same diagnosis as the query), when fitted


def calibrate(conn, model_id: int, results, cals: dict | None = None) -> None:
    """Attach each neighbour's calibrated P(same diagnosis) and each query's vote (the
    model's medsim.calibrations rows, fitted by `medsim evaluate`, unless given); no
    rows, no numbers."""
    from medsim.training import calibration

    cals = calibration.load(conn, model_id) if cals is None else cals
    if not cals:
        return
    for q, hits in results:
        for h in hits:
            c = cals.get(h.dataset)
            h.p_same = c.p_same(h.distance) if c else None
        q.vote = calibration.vote(hits, cals, q.dataset)


@dataclass
class Filters:
    """What a search may return. `where`: dataset, split, label, modality or any metadata
    key -> a value or a list of values (medsim.gallery_match). The query's own patient is
    left out unless include_own_patient; per_patient caps images per patient."""

    where: dict = field(default_factory=dict)
    include_own_patient: bool = False
    per_patient: int | None = None

    def __post_init__(self):
        if self.per_patient is not None and self.per_patient < 1:
            raise BadArgument(f"per_patient must be at least 1, got {self.per_patient}")
        bad = [k for k, v in self.where.items()
               if not isinstance(v, str) and not (isinstance(v, list) and all(isinstance(x, str) for x in v))]
        if bad:
            raise BadArgument(f"filter values must be strings or lists of strings: {', '.join(bad)}")
        if "split" in self.where:
            wanted = [self.where["split"]] if isinstance(self.where["split"], str) else self.where["split"]
            outside = sorted(set(wanted) - set(GALLERY_SPLITS))
            if outside:
                raise BadArgument(f"the gallery holds only {', '.join(GALLERY_SPLITS)}; split {', '.join(outside)} "
                                  f"is never returned")

    def exclude_patient(self, q: Query) -> str | None:
        return None if self.include_own_patient else q.patient_key


@dataclass
class StoredImage(StoredRow):
    dataset: str
    split: str
    label_name: str
    patient_key: str | None
    embedding: object  # pgvector Vector, or None when not embedded for this model


@dataclass
class ImageMeta:
    id: int
    dataset: str
    split: str
    label_name: str
    patient_key: str | None
    study_id: str | None


class Embedder:
    """The model's network, loaded on first use (torch import and checkpoint read)."""

    def __init__(self, conn, model_row: registry.ModelRow):
        self.conn, self.model_row, self.net = conn, model_row, None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        from medsim.training import network

        if self.net is None:
            self.net = self.model_row.load(self.conn)
        return network.embed(self.net, x[None])[0]


def query_from_id(conn, embedder: Embedder, image_id: int) -> Query:
    r = one(conn, Q.image_for_search, {"id": image_id, "model_id": embedder.model_row.id}, as_=StoredImage)
    if r is None:
        raise NotFound(f"no image with id {image_id}")
    x = r.decode_or_refuse()
    v = r.embedding.to_numpy() if r.embedding is not None else embedder(x)  # not embedded yet
    q = Query(f"image {image_id}", x, v.astype(np.float32), image_id, r.dataset, r.label_name,
              patient_key=r.patient_key)
    if r.split in GALLERY_SPLITS:
        q.in_gallery = [image_id]
    return q


def query_from_file(conn, embedder: Embedder, path) -> Query:
    x = load_image_file(path, size=int(embedder.model_row.config.get("image_size", 28)))
    return query_from_pixels(conn, embedder, x, Path(path).name)


def query_from_pixels(conn, embedder: Embedder, x: np.ndarray, label: str) -> Query:
    """An image from outside (a file, an upload), already at the model's input size."""
    digest = hashlib.sha256(x.tobytes()).digest()
    same = [r[0] for r in conn.execute(Q.gallery_images_by_sha256,
                                       {"sha256": digest, "splits": list(GALLERY_SPLITS)})]
    x3 = np.repeat(x, 3, axis=2) if x.shape[2] == 1 else x
    return Query(label, x3, embedder(x3), in_gallery=same)


def search_pgvector(conn, q: Query, k: int, model_id: int, f: Filters, exact: bool = False) -> list[Hit]:
    """HNSW when the model has its index; `exact` turns index scans off for this one
    statement (SET LOCAL in its own transaction, or savepoint), a sequential scan."""
    exclude = q.in_gallery[0] if len(q.in_gallery) == 1 else None
    args = {"q": q.vector, "k": min(k + len(q.in_gallery), MAX_K), "model_id": model_id,
            "filter": Jsonb(f.where), "exclude_patient": f.exclude_patient(q), "exclude": exclude,
            "per_patient": f.per_patient}
    if exact:
        with conn.transaction():
            conn.execute("SET LOCAL enable_indexscan = off")
            hits = rows(conn, Q.search_gallery, args, as_=Hit)
    else:
        hits = rows(conn, Q.search_gallery, args, as_=Hit)
    return [h for h in hits if h.image_id not in q.in_gallery][:k]


class FaissSearcher:
    """One loaded (and freshness-checked) index per call. A filter or the patient
    exclusion becomes an IDSelector over the same rows medsim.search_gallery would allow."""

    def __init__(self, conn, model_id: int, index_path=None, built=None):
        from medsim.search import faiss_index

        self.conn, self.model_id, self.faiss_index = conn, model_id, faiss_index
        if built is not None:  # already loaded and checked (medsim serve keeps one per model)
            self.built = built
        elif index_path is None:
            self.built = faiss_index.load_build(conn, faiss_index.latest_build(conn, model_id), model_ref=model_id)
        else:
            self.built = faiss_index.load(conn, index_path, model_ref=model_id)
        self.selectors = {}

    def params(self, f: Filters, exclude_patient: str | None):
        import faiss

        if not f.where and exclude_patient is None:
            return None
        key = (json.dumps(f.where, sort_keys=True), exclude_patient)
        if key not in self.selectors:
            ids = np.array([r[0] for r in self.conn.execute(Q.gallery_ids_matching, {
                "model_id": self.model_id, "filter": Jsonb(f.where), "exclude_patient": exclude_patient})], np.int64)
            self.selectors[key] = faiss.SearchParameters(sel=faiss.IDSelectorBatch(ids))
        return self.selectors[key]

    def __call__(self, q: Query, k: int, f: Filters) -> list[Hit]:
        params = self.params(f, f.exclude_patient(q))
        want = k + len(q.in_gallery)
        fetch = want if f.per_patient is None else want * 4
        while True:  # with a per-patient cap, fetch more until k survive it (or none are left)
            D, I = self.faiss_index.search(self.built.index, q.vector[None], min(fetch, self.built.index.ntotal),
                                           params)
            pairs = [(int(i), float(d)) for d, i in zip(D[0], I[0], strict=True) if i >= 0 and i not in q.in_gallery]
            meta = {m.id: m for m in rows(self.conn, Q.image_metadata, {"ids": [i for i, _ in pairs]},
                                          as_=ImageMeta)}
            hits, per = [], {}
            for i, d in pairs:
                m = meta[i]
                group = m.patient_key or f"image:{i}"
                if f.per_patient is not None and per.get(group, 0) >= f.per_patient:
                    continue
                per[group] = per.get(group, 0) + 1
                hits.append(Hit(i, m.dataset, m.split, m.label_name, d, m.patient_key, m.study_id))
            exhausted = (I[0] < 0).any() or fetch >= self.built.index.ntotal
            if len(hits) >= k or f.per_patient is None or exhausted:
                return hits[:k]
            fetch *= 4


def check_gallery(conn, model_id: int, where: dict) -> None:
    """NotFound, saying what to do, when no gallery image of the model passes the filter."""
    if scalar(conn, Q.gallery_count, {"model_id": model_id, "filter": Jsonb(where)}) == 0:
        raise NotFound(f"the gallery is empty for model {model_id}"
                       + (f" and {', '.join(f'{k_} {v}' for k_, v in where.items())}" if where else "")
                       + ": ingest images and run the embedding worker first, or loosen the filter")


def search(conn, *, image_ids=(), image_files=(), k: int = 4, dataset: str | None = None,
           engine: str = "pgvector", model_ref="current", index_path=None,
           filters: Filters | None = None) -> list[tuple[Query, list[Hit]]]:
    if not 1 <= k <= MAX_K:
        raise BadArgument(f"k must be between 1 and {MAX_K}, got {k}")
    if engine not in ENGINES:
        raise BadArgument(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if not image_ids and not image_files:
        raise BadArgument("give --image-id or --image-file")
    f = filters or Filters()
    if dataset is not None:
        f = Filters({**f.where, "dataset": dataset}, f.include_own_patient, f.per_patient)
    row = registry.get(conn, model_ref)
    check_gallery(conn, row.id, f.where)
    embedder = Embedder(conn, row)
    queries = [query_from_id(conn, embedder, i) for i in image_ids]
    queries += [query_from_file(conn, embedder, p) for p in image_files]
    if engine == "faiss":
        searcher = FaissSearcher(conn, row.id, index_path)
        results = [(q, searcher(q, k, f)) for q in queries]
    else:
        results = [(q, search_pgvector(conn, q, k, row.id, f, exact=engine == "exact")) for q in queries]
    calibrate(conn, row.id, results)
    return results


def example_queries(conn, flags) -> list[int]:
    """The first test image of each subset: the demo's montage."""
    return [r[0] for r in conn.execute(Q.first_test_image_per_dataset, {"flags": list(flags)})]


def as_json(results) -> list[dict]:
    return [{"query": {"label": q.label, "image_id": q.image_id, "dataset": q.dataset,
                       "label_name": q.label_name, "in_gallery": q.in_gallery},
             "vote": q.vote, "neighbours": [h.__dict__ for h in hits]} for q, hits in results]


def format_results(results) -> str:
    lines = []
    for q, hits in results:
        about = f" ({q.dataset}: {q.label_name})" if q.dataset else ""
        lines.append(f"query {q.label}{about}")
        if q.in_gallery:
            lines.append(f"  note: the query is itself in the gallery (image id "
                         f"{', '.join(map(str, q.in_gallery))}); left out of its neighbours")
        for rank, h in enumerate(hits, 1):
            p = f"  P(same) {h.p_same:.2f}" if h.p_same is not None else ""
            lines.append(f"  {rank:2d}. image {h.image_id:<7d} {h.dataset:16s} {h.split:5s} "
                         f"{h.label_name[:40]:40s} distance {h.distance:.4f}{p}")
        if q.vote:
            v = q.vote
            conf = (f"; calibrated P(right) {v['confidence']:.2f}" if v["confidence"] is not None else "")
            lines.append(f"  vote: {v['label_name']} ({v['votes']} of {v['of']} {v['dataset']} neighbours{conf})")
    return "\n".join(lines)


def montage(conn, results, out: Path | str) -> Path:
    """The notebook's figure: one row per query, the query then its neighbours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = max((len(h) for _, h in results), default=0)
    fig, axes = plt.subplots(len(results), k + 1, figsize=(2 * (k + 1), 2.2 * len(results)), dpi=100,
                             squeeze=False)
    for r, (q, hits) in enumerate(results):
        pix = {p.id: p.decode() for p in
               rows(conn, Q.image_pixels, {"ids": [h.image_id for h in hits]}, as_=StoredRow)}
        panels = [(q.pixels, f"QUERY {q.label}\n{q.dataset or ''} {q.label_name or ''}".strip())]
        panels += [(pix[h.image_id], f"{h.dataset}\n{h.label_name[:22]} d={h.distance:.3f}") for h in hits]
        for c in range(k + 1):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(panels):
                ax.imshow(panels[c][0], interpolation="nearest")
                ax.set_title(panels[c][1], fontsize=7)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
