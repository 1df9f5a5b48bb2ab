"""The same picture at any size is recognised as the stored image (issue 39): a perceptual
hash stored per image at every ingest, near hashes confirmed by pixel correlation."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from medsim.images import from_bytes, perceptual
from medsim.sources import archive
from medsim.sources.folder import FolderSource
from tests.helpers import embed_all, ingest_synth, register_model, search

FILTERS = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
           "bicubic": Image.Resampling.BICUBIC}
SCALES = (0.5, 2, 4, 18)


def texture(rng, size=28) -> np.ndarray:
    """A smooth random picture (speckle-free ultrasound-like structure): every one differs
    in its low frequencies, which is what a perceptual hash reads."""
    small = rng.random((5, 5))
    x = np.asarray(Image.fromarray((small * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC))
    return np.clip(x.astype(np.float32) + rng.normal(0, 4, (size, size)), 0, 255).astype(np.uint8)


@pytest.fixture
def gallery(conn, tmp_path, db_url):
    """A folder of 24 distinct 28 px pictures ingested, an (untrained) model, all embedded."""
    rng = np.random.default_rng(39)
    root = tmp_path / "src"
    for n in range(24):
        (root / f"l{n % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(texture(rng)).save(root / f"l{n % 2}" / f"p{n}.png")
    archive.ingest_archive(conn, FolderSource(root), "tex", progress=False)
    register_model(conn)
    embed_all(db_url)
    return conn


def stored(conn, image_id):
    r = conn.execute("SELECT pixels, height, width, channels, bit_depth FROM medsim.images WHERE id = %s",
                     (image_id,)).fetchone()
    return from_bytes(bytes(r[0]), *r[1:])


def copies(x: np.ndarray):
    """(name, file bytes) for each re-saved copy the issue names."""
    im = Image.fromarray(x[..., 0])
    for s in SCALES:
        for name, f in FILTERS.items():
            b = io.BytesIO()
            im.resize((round(x.shape[1] * s), round(x.shape[0] * s)), f).save(b, "PNG")
            yield f"{s}x {name}", b.getvalue()
    b = io.BytesIO()
    im.save(b, "JPEG", quality=90)
    yield "jpeg q=90", b.getvalue()


def test_a_resized_copy_is_recognised_as_the_stored_image(gallery, tmp_path):
    conn = gallery
    ids = [r[0] for r in conn.execute("SELECT id FROM medsim.images WHERE split = 'train' ORDER BY id LIMIT 3")]
    missed = []
    for image_id in ids:
        for name, data in copies(stored(conn, image_id)):
            path = tmp_path / f"{image_id}-{name.replace(' ', '_')}.png"
            path.write_bytes(data)
            [(q, hits)] = search(conn, image_files=[path], k=5)
            if q.image_id != image_id or q.in_gallery != [image_id] or image_id in [h.image_id for h in hits]:
                missed.append((image_id, name, q.image_id, q.in_gallery))
    assert missed == []
    # the note says what it is, the way the note for identical pixels does
    from medsim.search import pipeline
    from medsim.search.context import Context
    from medsim.search.request import ByFile, Request

    r = pipeline.run(Context(conn), Request(ByFile(str(tmp_path / f"{ids[0]}-4x_bicubic.png")), k=3))
    assert any(n.startswith(f"the query is image {ids[0]} at another size (112 x 112 px against 28 x 28 stored")
               for n in r.notes), r.notes


def test_a_different_picture_is_not_recognised_even_with_the_same_hash(gallery, tmp_path):
    conn = gallery
    a, b = [r[0] for r in conn.execute("SELECT id FROM medsim.images WHERE split = 'train' ORDER BY id LIMIT 2")]
    x = stored(conn, a)
    # the same histogram, another picture: its pixels shuffled, and transposed
    rng = np.random.default_rng(0)
    for name, y in (("shuffled", rng.permutation(x.ravel()).reshape(x.shape)), ("transposed", x.transpose(1, 0, 2))):
        Image.fromarray(np.ascontiguousarray(y[..., 0])).resize((56, 56), Image.Resampling.BICUBIC).save(
            tmp_path / f"{name}.png")
        [(q, _)] = search(conn, image_files=[tmp_path / f"{name}.png"], k=3)
        assert q.image_id is None and q.in_gallery == [], name
    # a stored picture whose hash is made the query's own: the pixels still say no
    Image.fromarray(x[..., 0]).resize((56, 56), Image.Resampling.BICUBIC).save(tmp_path / "copy.png")
    h = perceptual.phash(np.asarray(Image.open(tmp_path / "copy.png"))[..., None])
    conn.execute("UPDATE medsim.images SET phash = %s WHERE id = %s", (h, b))
    [(q, hits)] = search(conn, image_files=[tmp_path / "copy.png"], k=3)
    assert q.image_id == a and b not in [i for i, _ in q.on_file] and a not in [h.image_id for h in hits]


def test_every_ingest_path_stores_the_hash(conn, synth_dir, tmp_path):
    ingest_synth(conn, synth_dir, flags=("breastmnist",))  # MedMNIST .npz (binary COPY built by numpy)
    rng = np.random.default_rng(1)
    root = tmp_path / "folder" / "a"
    root.mkdir(parents=True)
    for n in range(3):
        Image.fromarray(texture(rng, 40)).save(root / f"{n}.png")
    archive.ingest_archive(conn, FolderSource(root.parent), "folder", progress=False)
    dcm = tmp_path / "dicom" / "ct"
    dcm.mkdir(parents=True)
    shutil.copy(Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm", dcm / "ct.dcm")
    archive.ingest_archive(conn, FolderSource(dcm.parent), "dicom", progress=False)
    got = conn.execute("SELECT d.flag, i.pixels, i.height, i.width, i.channels, i.bit_depth, i.phash "
                       "FROM medsim.images i JOIN medsim.datasets d ON d.id = i.dataset_id").fetchall()
    assert {r[0] for r in got} == {"breastmnist", "folder", "dicom"}
    wrong = [r[0] for r in got if r[6] is None or r[6] != perceptual.phash(from_bytes(bytes(r[1]), *r[2:6]))]
    assert wrong == []
    assert {r[0] for r in got if r[5] == 16} == {"dicom"}  # the 16-bit path is hashed too


def test_rows_stored_before_the_hash_get_one_from_migrate(conn, synth_dir):
    from medsim.sources import ingest

    ingest_synth(conn, synth_dir, flags=("breastmnist",))
    want = dict(conn.execute("SELECT id, phash FROM medsim.images").fetchall())
    conn.execute("UPDATE medsim.images SET phash = NULL")
    assert ingest.backfill_phashes(conn, batch=97) == len(want)
    assert dict(conn.execute("SELECT id, phash FROM medsim.images").fetchall()) == want
    assert ingest.backfill_phashes(conn) == 0


def test_the_hash_is_near_for_copies_and_far_for_others():
    rng = np.random.default_rng(3)
    xs = [texture(rng)[..., None] for _ in range(30)]
    hs = perceptual.phashes(xs)
    far = min(perceptual.hamming(int(hs[i]), int(hs[j])) for i in range(30) for j in range(i + 1, 30))
    assert far > 6
    big = np.asarray(Image.fromarray(xs[0][..., 0]).resize((504, 504), Image.Resampling.BILINEAR))[..., None]
    assert perceptual.hamming(perceptual.phash(big), int(hs[0])) <= 4
