"""The same picture at any size (issue 39): stored BreastMNIST training images re-saved at
0.5x, 2x, 4x and 18x (Pillow's nearest, bilinear, bicubic) and as JPEG q = 90, each searched
by file (the pipeline, as `medsim search --image-file` runs it) against the search by its id
(`--dataset breastmnist`, k = 10). Per copy: % recognised as the image itself (its identity
taken, left out of its neighbours), % whose first neighbour is the image itself (of those
not recognised), and the mean overlap of the first 9 neighbours with the search by id; and
the same two for the copy's own embedding searched as a vector (what the network alone
does, before any identity: the figure augmented training moves).

Then the real case: BUSI's originals (../shared/busi, 256 px) paired to the BreastMNIST
images they were shrunk to by pixel correlation at 28 px (each BUSI image's best-
correlating BreastMNIST image, kept when r >= --pair-r and the best is mutual), and each
paired original searched by file: how often its BreastMNIST version is recognised, or first.

    python bench/bench_any_size.py            # the demo's database (MEDSIM_HOME or DATABASE_URL)
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from medsim import db, images
from medsim.images import from_bytes, perceptual
from medsim.search import pipeline
from medsim.search.context import Context
from medsim.search.request import ByFile, ById, ByVector, Filters, Request

FILTERS = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
           "bicubic": Image.Resampling.BICUBIC}
SCALES = (0.5, 2, 4, 18)
BUSI = Path(__file__).resolve().parents[2] / "shared" / "busi"


def copies(x: np.ndarray):
    im = Image.fromarray(x[..., 0] if x.shape[2] == 1 else x)
    for s in SCALES:
        for name, f in FILTERS.items():
            b = io.BytesIO()
            im.resize((round(x.shape[1] * s), round(x.shape[0] * s)), f).save(b, "PNG")
            yield f"{s}x {name}", "png", b.getvalue()
    b = io.BytesIO()
    im.save(b, "JPEG", quality=90)
    yield "1x jpeg q=90", "jpg", b.getvalue()


def by_file(ctx, path: Path, k: int, where: dict):
    return pipeline.run(ctx, Request(ByFile(str(path)), k=k, filters=Filters(where)))


def embed(ctx, model, path: Path) -> np.ndarray:
    """The file's own embedding, as a search by file computes it before any identity."""
    x = images.model_input(images.read(str(path), name=path.name), int(model.config.get("image_size", 28)))
    return ctx.embed(model, x).astype(np.float32)


def overlap9(ids_file: list, ids_id: list, self_id: int) -> int:
    return len(set([i for i in ids_file if i != self_id][:9]) & set(ids_id[:9]))


def resized(conn, n: int, k: int, tmp: Path) -> None:
    ctx = Context(conn)
    where = {"dataset": "breastmnist"}
    ids = [r[0] for r in conn.execute(
        "SELECT i.id FROM medsim.images i JOIN medsim.datasets d ON d.id = i.dataset_id "
        "WHERE d.flag = 'breastmnist' AND d.image_size = 28 AND i.split = 'train' ORDER BY i.id LIMIT %s", (n,))]
    stats: dict[str, list] = {}
    t0 = time.perf_counter()
    for image_id in ids:
        ref = pipeline.run(ctx, Request(ById(image_id), k=k, filters=Filters(where)))
        ref_ids = [h.image_id for h in ref.hits]
        p = ctx.stored(image_id)
        for name, ext, data in copies(p.array()):
            path = tmp / f"{image_id}.{ext}"
            path.write_bytes(data)
            r = by_file(ctx, path, k, where)
            got = [h.image_id for h in r.hits]
            recognised = r.query.image_id == image_id
            # the network alone: the copy's own embedding, searched as a vector (no identity)
            own = pipeline.run(ctx, Request(ByVector(r.query.vector if not recognised else embed(ctx, ref.model, path)),
                                            k=k + 1, filters=Filters(where)))
            own_ids = [h.image_id for h in own.hits]
            stats.setdefault(name, []).append((recognised, not recognised and got[:1] == [image_id],
                                               overlap9(got, ref_ids, image_id), own_ids[:1] == [image_id],
                                               overlap9(own_ids, ref_ids, image_id)))
    print(f"{len(ids)} BreastMNIST training images, model {ref.model.id}, k = {k}, --dataset breastmnist "
          f"({time.perf_counter() - t0:.0f} s)")
    print("| copy | recognised as itself | itself first (not recognised) | overlap of first 9 with by id "
          "| the copy's own embedding: itself first | its overlap of first 9 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, v in stats.items():
        a = np.array(v, dtype=float)
        rest = (~a[:, 0].astype(bool)).sum()
        first = f"{a[:, 1].sum() / rest:.0%} of {rest:.0f}" if rest else "-"
        print(f"| {name} | {a[:, 0].mean():.0%} | {first} | {a[:, 2].mean():.1f} of 9 | {a[:, 3].mean():.0%} "
              f"| {a[:, 4].mean():.1f} of 9 |")


def busi_pairs(conn, pair_r: float):
    """BUSI originals -> [(path, BreastMNIST id, r)]: Pearson correlation of the 28 px grey
    images (the one resize), the best match each way, kept when mutual and r >= pair_r."""
    files = sorted(p for p in BUSI.rglob("*.png"))
    qb = np.stack([perceptual.grey(images.read(p, name=p.name), 28).ravel() for p in files])
    rows = conn.execute(
        "SELECT i.id, i.pixels, i.height, i.width, i.channels, i.bit_depth FROM medsim.images i "
        "JOIN medsim.datasets d ON d.id = i.dataset_id WHERE d.flag = 'breastmnist' AND d.image_size = 28 "
        "ORDER BY i.id").fetchall()
    ids = np.array([r[0] for r in rows])
    xb = np.stack([perceptual.grey(from_bytes(bytes(r[1]), *r[2:]), 28).ravel() for r in rows])

    def z(a):
        a = a - a.mean(1, keepdims=True)
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-9)

    R = z(qb) @ z(xb).T  # (BUSI, BreastMNIST)
    best, back = R.argmax(1), R.argmax(0)
    pairs = [(files[i], int(ids[j]), float(R[i, j])) for i, j in enumerate(best)
             if back[j] == i and R[i, j] >= pair_r]
    return files, len(ids), pairs, R.max(1)


def busi(conn, k: int, pair_r: float) -> None:
    if not BUSI.is_dir():
        print(f"no {BUSI}: the BUSI part is skipped")
        return
    files, n_mnist, pairs, best = busi_pairs(conn, pair_r)
    print(f"\nBUSI: {len(files)} originals, {n_mnist} BreastMNIST images; best r per original: median "
          f"{np.median(best):.3f}, {np.mean(best >= 0.9):.0%} >= 0.9, {np.mean(best >= 0.95):.0%} >= 0.95; "
          f"pairs (mutual best, r >= {pair_r}): {len(pairs)}")
    ctx = Context(conn)
    out = []
    for path, mnist_id, _r in pairs:
        res = by_file(ctx, path, k, {"dataset": "breastmnist"})
        got = [h.image_id for h in res.hits]
        out.append((res.query.image_id == mnist_id, res.query.image_id is None and got[:1] == [mnist_id],
                    res.query.image_id not in (None, mnist_id)))
    a = np.array(out, dtype=float) if out else np.zeros((0, 3))
    n = len(out)
    if n:
        print(f"searched by file: recognised as its BreastMNIST version {a[:, 0].sum():.0f} of {n} "
              f"({a[:, 0].mean():.0%}); its version first (not recognised) {a[:, 1].sum():.0f}; recognised or first "
              f"{(a[:, 0] + a[:, 1]).mean():.0%}; recognised as another image {a[:, 2].sum():.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50, help="BreastMNIST training images (the lowest ids)")
    ap.add_argument("--k", type=int, default=10, help="neighbours per search")
    ap.add_argument("--pair-r", type=float, default=0.95, help="correlation at 28 px that pairs BUSI to BreastMNIST")
    args = ap.parse_args()
    with db.connect(autocommit=True) as conn, tempfile.TemporaryDirectory(prefix="any-size-") as tmp:
        resized(conn, args.n, args.k, Path(tmp))
        busi(conn, args.k, args.pair_r)


if __name__ == "__main__":
    main()
