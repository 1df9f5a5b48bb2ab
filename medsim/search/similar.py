"""Similar-image search for people: by stored image id or by an image file.

The query is embedded the way training inputs were (28 px, grey repeated to three
channels, scaled to [-1, 1]); the gallery is train + val. A query that is itself in
the gallery (same id, or byte-identical pixels) is reported as such and left out of
its own neighbours.

Cost follows need: a stored image that is already embedded is searched with its
stored vector, so search by id through pgvector imports neither torch nor FAISS. The
network is loaded only for an image file or an image not embedded yet, and a FAISS
index is loaded and checked for freshness once per call, not once per query.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medsim import registry
from medsim.errors import BadArgument, DataRefused, NotFound
from medsim.pixels import decode, load_image_file
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


@dataclass
class Hit:
    image_id: int
    dataset: str
    split: str
    label_name: str
    distance: float


@dataclass
class StoredImage:
    id: int
    pixels: bytes
    height: int
    width: int
    channels: int
    bit_depth: int
    dataset: str
    split: str
    label_name: str
    embedding: object  # pgvector Vector, or None when not embedded for this model


@dataclass
class ImageMeta:
    id: int
    dataset: str
    split: str
    label_name: str


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
    try:
        x = decode(bytes(r.pixels), r.height, r.width, r.channels, r.bit_depth)
    except ValueError as err:
        raise DataRefused(f"image {image_id} is stored broken ({err}); it cannot be shown or searched") from None
    v = r.embedding.to_numpy() if r.embedding is not None else embedder(x)  # not embedded yet
    q = Query(f"image {image_id}", x, v.astype(np.float32), image_id, r.dataset, r.label_name)
    if r.split in GALLERY_SPLITS:
        q.in_gallery = [image_id]
    return q


def query_from_file(conn, embedder: Embedder, path) -> Query:
    x = load_image_file(path)
    digest = hashlib.sha256(x.tobytes()).digest()
    same = [r[0] for r in conn.execute(Q.gallery_images_by_sha256,
                                       {"sha256": digest, "splits": list(GALLERY_SPLITS)})]
    x3 = np.repeat(x, 3, axis=2) if x.shape[2] == 1 else x
    return Query(Path(path).name, x3, embedder(x3), in_gallery=same)


def search_pgvector(conn, q: Query, k: int, model_id: int, dataset: str | None) -> list[Hit]:
    exclude = q.in_gallery[0] if len(q.in_gallery) == 1 else None
    with conn.transaction():
        conn.execute("SET LOCAL hnsw.iterative_scan = strict_order")
        hits = rows(conn, Q.search_by_vector, {"q": q.vector, "k": k + len(q.in_gallery), "model_id": model_id,
                                               "dataset": dataset, "exclude": exclude}, as_=Hit)
    return [h for h in hits if h.image_id not in q.in_gallery][:k]


class FaissSearcher:
    """One loaded (and freshness-checked) index, and one id selector per dataset filter."""

    def __init__(self, conn, model_id: int, index_path, dataset: str | None):
        import faiss

        from medsim.search import faiss_index

        self.conn, self.faiss_index = conn, faiss_index
        if index_path is None:
            self.built = faiss_index.load_build(conn, faiss_index.latest_build(conn, model_id), model_ref=model_id)
        else:
            self.built = faiss_index.load(conn, index_path, model_ref=model_id)
        self.params = None
        if dataset is not None:
            ids = np.array([r[0] for r in conn.execute(Q.gallery_ids_of_dataset,
                                                       {"model_id": model_id, "dataset": dataset})], np.int64)
            self.params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(ids))

    def __call__(self, q: Query, k: int) -> list[Hit]:
        D, I = self.faiss_index.search(self.built.index, q.vector[None], k + len(q.in_gallery), self.params)
        pairs = [(int(i), float(d)) for d, i in zip(D[0], I[0], strict=True)
                 if i >= 0 and i not in q.in_gallery][:k]
        meta = {m.id: m for m in rows(self.conn, Q.image_metadata, {"ids": [i for i, _ in pairs]}, as_=ImageMeta)}
        return [Hit(i, meta[i].dataset, meta[i].split, meta[i].label_name, d) for i, d in pairs]


def search(conn, *, image_ids=(), image_files=(), k: int = 4, dataset: str | None = None,
           engine: str = "pgvector", model_ref="current", index_path=None) -> list[tuple[Query, list[Hit]]]:
    if not 1 <= k <= MAX_K:
        raise BadArgument(f"k must be between 1 and {MAX_K}, got {k}")
    if engine not in ENGINES:
        raise BadArgument(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if not image_ids and not image_files:
        raise BadArgument("give --image-id or --image-file")
    row = registry.get(conn, model_ref)
    if scalar(conn, Q.gallery_count, {"model_id": row.id, "dataset": dataset}) == 0:
        raise NotFound(f"the gallery is empty for model {row.id}"
                       + (f" and dataset {dataset}" if dataset else "")
                       + ": ingest images and run the embedding worker first")
    embedder = Embedder(conn, row)
    queries = [query_from_id(conn, embedder, i) for i in image_ids]
    queries += [query_from_file(conn, embedder, p) for p in image_files]
    if engine == "faiss":
        searcher = FaissSearcher(conn, row.id, index_path, dataset)
        return [(q, searcher(q, k)) for q in queries]
    return [(q, search_pgvector(conn, q, k, row.id, dataset)) for q in queries]


def example_queries(conn, flags) -> list[int]:
    """The first test image of each subset: the demo's montage."""
    return [r[0] for r in conn.execute(Q.first_test_image_per_dataset, {"flags": list(flags)})]


def as_json(results) -> list[dict]:
    return [{"query": {"label": q.label, "image_id": q.image_id, "dataset": q.dataset,
                       "label_name": q.label_name, "in_gallery": q.in_gallery},
             "neighbours": [h.__dict__ for h in hits]} for q, hits in results]


def format_results(results) -> str:
    lines = []
    for q, hits in results:
        about = f" ({q.dataset}: {q.label_name})" if q.dataset else ""
        lines.append(f"query {q.label}{about}")
        if q.in_gallery:
            lines.append(f"  note: the query is itself in the gallery (image id "
                         f"{', '.join(map(str, q.in_gallery))}); left out of its neighbours")
        for rank, h in enumerate(hits, 1):
            lines.append(f"  {rank:2d}. image {h.image_id:<7d} {h.dataset:16s} {h.split:5s} "
                         f"{h.label_name[:40]:40s} distance {h.distance:.4f}")
    return "\n".join(lines)


@dataclass
class Pixels:
    id: int
    pixels: bytes
    height: int
    width: int
    channels: int
    bit_depth: int


def montage(conn, results, out: Path | str) -> Path:
    """The notebook's figure: one row per query, the query then its neighbours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = max((len(h) for _, h in results), default=0)
    fig, axes = plt.subplots(len(results), k + 1, figsize=(2 * (k + 1), 2.2 * len(results)), dpi=100,
                             squeeze=False)
    for r, (q, hits) in enumerate(results):
        pix = {p.id: decode(bytes(p.pixels), p.height, p.width, p.channels, p.bit_depth) for p in
               rows(conn, Q.image_pixels, {"ids": [h.image_id for h in hits]}, as_=Pixels)}
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
