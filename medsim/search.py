"""Similar-image search for people: by stored image id or by an image file.

The query is embedded the way training inputs were (28 px, grey repeated to three
channels, scaled to [-1, 1]); the gallery is train + val. A query that is itself in
the gallery (same id, or byte-identical pixels) is reported as such and left out of
its own neighbours.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medsim import data, registry
from medsim import index as faiss_index
from medsim import model as M
from medsim.queries import Q

GALLERY_SPLITS = ("train", "val")


class SearchError(ValueError):
    pass


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


def load_image_file(path: Path | str, size: int = 28) -> np.ndarray:
    """Any PNG/JPEG/... -> (size, size, C) uint8, C = 1 for grey sources, else 3."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise SearchError(f"{path}: {'a directory, not an image file' if path.is_dir() else 'no such file'}")
    try:
        with Image.open(path) as img:
            img.load()
            grey = img.mode in ("1", "L", "LA", "I", "I;16", "F")
            img = img.convert("L" if grey else "RGB").resize((size, size), Image.Resampling.BICUBIC)
            x = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise SearchError(f"{path}: not a readable image ({err})") from err
    return x[..., None] if x.ndim == 2 else x


def query_from_id(conn, model_row, net, image_id: int) -> Query:
    row = conn.execute(Q.image_for_search, {"id": image_id, "model_id": model_row.id}).fetchone()
    if row is None:
        raise SearchError(f"no image with id {image_id}")
    _, pixels, h, w, c, flag, split, label_name, vec = row
    x = data.decode(bytes(pixels), h, w, c)
    v = vec.to_numpy() if vec is not None else M.embed(net, x[None])[0]  # not embedded yet: compute
    q = Query(f"image {image_id}", x, v.astype(np.float32), image_id, flag, label_name)
    if split in GALLERY_SPLITS:
        q.in_gallery = [image_id]
    return q


def query_from_file(conn, model_row, net, path) -> Query:
    x = load_image_file(path)
    digest = hashlib.sha256(x.tobytes()).digest()
    same = [r[0] for r in conn.execute(Q.gallery_images_by_sha256, {"sha256": digest})]
    x3 = np.repeat(x, 3, axis=2) if x.shape[2] == 1 else x
    return Query(Path(path).name, x3, M.embed(net, x3[None])[0], in_gallery=same)


def search_pgvector(conn, q: Query, k: int, model_id: int, dataset: str | None) -> list[Hit]:
    exclude = q.in_gallery[0] if len(q.in_gallery) == 1 else None
    with conn.transaction():
        conn.execute("SET LOCAL hnsw.iterative_scan = strict_order")
        rows = conn.execute(Q.search_by_vector, {"q": q.vector, "k": k + len(q.in_gallery), "model_id": model_id,
                                                 "dataset": dataset, "exclude": exclude}).fetchall()
    hits = [Hit(*r) for r in rows if r[0] not in q.in_gallery]
    return hits[:k]


def search_faiss(conn, q: Query, k: int, model_id: int, dataset: str | None, index_path) -> list[Hit]:
    import faiss

    built = faiss_index.load(conn, index_path, model_ref=model_id)
    params = None
    if dataset is not None:
        ids = np.array([r[0] for r in conn.execute(Q.gallery_ids_of_dataset,
                                                   {"model_id": model_id, "dataset": dataset})], np.int64)
        params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(ids))
    kk = k + len(q.in_gallery)
    D, I = built.index.search(q.vector[None].astype(np.float32), kk, params=params)
    pairs = [(int(i), float(np.sqrt(max(d, 0)))) for d, i in zip(D[0], I[0], strict=True)
             if i >= 0 and i not in q.in_gallery][:k]
    meta = {r[0]: r[1:] for r in conn.execute(Q.image_metadata, {"ids": [i for i, _ in pairs]})}
    return [Hit(i, *meta[i], d) for i, d in pairs]


def default_index_path(conn, model_id: int) -> str:
    row = conn.execute(Q.latest_index_build, {"model_id": model_id}).fetchone()
    if row is None:
        raise SearchError(f"no FAISS index built for model {model_id}: run `medsim index build` "
                          f"or use --engine pgvector")
    return row[0]


def search(conn, *, image_ids=(), image_files=(), k: int = 4, dataset: str | None = None,
           engine: str = "pgvector", model_ref="current", index_path=None) -> list[tuple[Query, list[Hit]]]:
    if k < 1:
        raise SearchError("k must be at least 1")
    if not image_ids and not image_files:
        raise SearchError("give --image-id or --image-file")
    row = registry.get(conn, model_ref)
    n_gallery = conn.execute(Q.gallery_count, {"model_id": row.id, "dataset": dataset}).fetchone()[0]
    if n_gallery == 0:
        raise SearchError(f"the gallery is empty for model {row.id}"
                          + (f" and dataset {dataset}" if dataset else "")
                          + ": ingest images and run the embedding worker first")
    net = row.load(conn)
    queries = [query_from_id(conn, row, net, i) for i in image_ids]
    queries += [query_from_file(conn, row, net, p) for p in image_files]
    if engine == "faiss":
        index_path = index_path or default_index_path(conn, row.id)
        return [(q, search_faiss(conn, q, k, row.id, dataset, index_path)) for q in queries]
    if engine != "pgvector":
        raise SearchError(f"engine must be faiss or pgvector, got {engine!r}")
    return [(q, search_pgvector(conn, q, k, row.id, dataset)) for q in queries]


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


def montage(conn, results, out: Path | str) -> Path:
    """The notebook's figure: one row per query, the query then its neighbours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = max((len(h) for _, h in results), default=0)
    fig, axes = plt.subplots(len(results), k + 1, figsize=(2 * (k + 1), 2.2 * len(results)), dpi=100,
                             squeeze=False)
    for r, (q, hits) in enumerate(results):
        pix = {i: data.decode(bytes(p), h, w, c) for i, p, h, w, c in
               conn.execute(Q.image_pixels, {"ids": [h.image_id for h in hits]})}
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
