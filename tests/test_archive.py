"""Bring your own archive: folders of PNG/JPEG/TIFF/BMP files, labelled by folder or by a
manifest with patients; 16-bit kept; splits grouped by patient; re-runs, bad files,
--strict, label changes, a crash mid-ingest. Real files written by Pillow, real Postgres."""

from __future__ import annotations

import csv
import hashlib
import hmac

import numpy as np
import pytest
from PIL import Image

from medsim import cli
from medsim.errors import BadArgument, DataRefused
from medsim.images import from_bytes
from medsim.sources import archive, splits
from medsim.sources.folder import FolderSource
from tests.helpers import embed_all, image_by_path, keyed, register_model, search

KEY = "a test key that is long enough"


def blob(rng, size=40, label=0, dtype=np.uint8):
    """A grey picture whose bright spot sits where its label says."""
    yy, xx = np.mgrid[0:size, 0:size]
    cy, cx = (size * 0.3, size * 0.3) if label == 0 else (size * 0.7, size * 0.7)
    x = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (size * 2.0)) * 0.7 + 0.15 + rng.normal(0, 0.03, (size, size))
    top = 255 if dtype == np.uint8 else 4095  # 12-bit data in a 16-bit file
    return (np.clip(x, 0, 1) * top).astype(dtype)


def make_folder(root, n_per_label=12, seed=0):
    """ImageFolder tree: two labels, four formats, one 16-bit TIFF, one large image."""
    rng = np.random.default_rng(seed)
    files = []
    for label, name in enumerate(("benign", "malignant")):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_label):
            fmt = ("png", "jpg", "bmp", "tif")[i % 4]
            if fmt == "tif":
                Image.fromarray(blob(rng, 36, label, np.uint16)).save(d / f"{name}_{i}.tif")
            elif fmt == "jpg":
                Image.fromarray(np.repeat(blob(rng, 40, label)[..., None], 3, axis=2)).save(d / f"{name}_{i}.jpg",
                                                                                          quality=95)
            else:
                Image.fromarray(blob(rng, 32 + i, label)).save(d / f"{name}_{i}.{fmt}")
            files.append(f"{name}/{name}_{i}.{fmt}")
    Image.fromarray(blob(rng, 300, 1)).save(root / "malignant" / "large.png")
    files.append("malignant/large.png")
    return files


def add_bad_files(root):
    good = (root / "benign" / "benign_0.png").read_bytes()
    (root / "benign" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "benign" / "notes.png").write_text("this is not an image")
    (root / "benign" / "readme.txt").write_text("labels: benign / malignant")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "stray.png")  # no label folder
    (root / ".DS_Store").write_bytes(b"\0\1")  # hidden: ignored silently


def test_image_folder_ingest_keeps_pixels_and_reports_bad_files(conn, tmp_path):
    root = tmp_path / "archive"
    files = make_folder(root)
    add_bad_files(root)
    r = archive.ingest_archive(conn, FolderSource(root, max_side=128), "mylab", progress=False, workers=2)
    assert r.added == len(files) == 25 and r.skipped == 4
    reasons = {p: why for p, kind, why in r.problems}
    assert "not a readable image" in reasons["benign/truncated.png"]
    assert "not a readable image" in reasons["benign/notes.png"]
    assert reasons["benign/readme.txt"] == "not an image file (suffix .txt)"
    assert reasons["stray.png"].startswith("not inside a label folder")
    assert conn.execute("SELECT count(*) FROM medsim.ingest_problems WHERE report_id = %s",
                        (r.report_id,)).fetchone() == (4,)
    # 16-bit stays 16-bit, byte for byte
    row = image_by_path(conn, "benign/benign_3.tif", "pixels, height, width, channels, bit_depth")
    with Image.open(root / "benign" / "benign_3.tif") as im:
        want = np.asarray(im)
    assert row[4] == 16 and np.array_equal(from_bytes(bytes(row[0]), *row[1:4], row[4])[..., 0], want)
    # the large image was shrunk to --max-side, its original size recorded
    big = image_by_path(conn, "malignant/large.png", "height, width, original_height, original_width")
    assert big == (128, 128, 300, 300)
    labels = conn.execute("SELECT medsim.label_name(dataset_id, labels), count(*) FROM medsim.images "
                          "GROUP BY 1 ORDER BY 1").fetchall()
    assert labels == [("benign", 12), ("malignant", 13)]
    ds = conn.execute("SELECT source_kind, split_method->>'method', n_samples FROM medsim.datasets").fetchone()
    assert ds[0] == "folder" and ds[1] == "grouped-stratified" and sum(ds[2].values()) == 25


def test_rerun_adds_only_new_images_and_reports_label_changes(conn, tmp_path, capsys):
    root = tmp_path / "archive"
    make_folder(root, n_per_label=6)
    src = FolderSource(root, max_side=256)
    first = archive.ingest_archive(conn, src, "mylab", progress=False)
    again = archive.ingest_archive(conn, src, "mylab", progress=False)
    # every file settled by the first run and unchanged: not even read (ledger.py)
    assert (again.added, again.unchanged, again.unchanged_files) == (0, 0, first.added + first.skipped)
    rechecked = archive.ingest_archive(conn, src, "mylab", progress=False, recheck=True)
    assert (rechecked.added, rechecked.unchanged, rechecked.unchanged_files) == (0, first.added, 0)
    # a new file, a copy of an existing picture under another name, and a relabelled one
    Image.fromarray(blob(np.random.default_rng(9), 30, 0)).save(root / "benign" / "new.png")
    (root / "benign" / "copy.bmp").write_bytes((root / "benign" / "benign_2.bmp").read_bytes())
    (root / "malignant" / "benign_0.png").write_bytes((root / "benign" / "benign_0.png").read_bytes())
    (root / "benign" / "benign_0.png").unlink()
    third = archive.ingest_archive(conn, src, "mylab", progress=False)
    assert (third.added, third.label_changes, third.relabelled) == (1, 1, 0)
    kinds = {p: k for p, k, _ in third.problems}
    assert kinds["malignant/benign_0.png"] == "label_changed"
    assert conn.execute("SELECT count(*) FROM medsim.images").fetchone() == (first.added + 1,)
    before = image_by_path(conn, "benign/benign_0.png", "labels")
    assert cli.main(["ingest-folder", str(root), "--name", "mylab", "--max-side", "256", "--relabel", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "0 images added" in out and "1 label change(s) (1 applied)" in out
    after = image_by_path(conn, "benign/benign_0.png", "labels")
    assert before == ([0],) and after == ([1],)


def test_strict_refuses_the_whole_folder(conn, tmp_path, capsys):
    root = tmp_path / "archive"
    make_folder(root, n_per_label=4)
    add_bad_files(root)
    with pytest.raises(DataRefused, match=r"4 file\(s\) cannot be used .* nothing was ingested \(--strict\)"):
        archive.ingest_archive(conn, FolderSource(root), "mylab", strict=True, progress=False)
    assert conn.execute("SELECT count(*) FROM medsim.images").fetchone() == (0,)
    assert conn.execute("SELECT status, skipped FROM medsim.ingest_reports").fetchone() == ("refused", 4)
    assert cli.main(["ingest-folder", str(root), "--name", "mylab", "--strict", "--quiet"]) == 2
    assert "nothing was ingested (--strict)" in capsys.readouterr().err


def write_manifest(path, rows, header=("path", "label", "patient_id", "study_id", "site")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def test_manifest_with_patients_groups_splits_and_hashes_ids(conn, tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    img = tmp_path / "img"
    img.mkdir()
    rows = []
    for p in range(30):  # 30 patients, 2-4 images each, one label per patient
        label = ("normal", "pneumonia")[p % 2]
        for j in range(2 + p % 3):
            name = f"p{p}_{j}.png"
            Image.fromarray(blob(rng, 28 + j, p % 2)).save(img / name)
            rows.append((f"img/{name}", label, f"PAT-{p:03d}", f"ST-{p}-{j // 2}", ("north", "south")[j % 2]))
    rows.append(("img/p0_0.png", "", "PAT-000", "", ""))  # no label: reported, not fatal
    manifest = tmp_path / "manifest.csv"
    write_manifest(manifest, rows)
    monkeypatch.delenv("MEDSIM_PATIENT_KEY", raising=False)
    with pytest.raises(BadArgument, match="set MEDSIM_PATIENT_KEY"):
        archive.ingest_archive(conn, FolderSource(tmp_path, manifest=manifest), "xr", progress=False)
    monkeypatch.setenv("MEDSIM_PATIENT_KEY", KEY)
    r = archive.ingest_archive(conn, FolderSource(tmp_path, manifest=manifest), "xr", progress=False)
    assert r.added == len(rows) - 1 and r.skipped == 1
    # no patient in two splits, and the split counts near 70/10/20
    assert conn.execute("SELECT count(*) FROM (SELECT patient_key FROM medsim.images GROUP BY 1 "
                        "HAVING count(DISTINCT split) > 1) x").fetchone() == (0,)
    per = dict(conn.execute("SELECT split, count(*) FROM medsim.images GROUP BY 1").fetchall())
    assert abs(per["train"] / r.added - 0.7) < 0.12 and per["val"] > 0 and per["test"] > 0
    # the id itself is nowhere in the database; the keyed hash is
    want = hmac.new(KEY.encode(), b"PAT-007", hashlib.sha256).hexdigest()
    assert conn.execute("SELECT count(*) FROM medsim.images WHERE patient_key = %s", (want,)).fetchone()[0] == 3
    dump = " ".join(str(x) for r_ in conn.execute("SELECT * FROM medsim.images").fetchall() for x in r_
                    if not isinstance(x, bytes | memoryview))
    assert "PAT-" not in dump and "ST-" not in dump and ".png" not in dump  # nor study ids, nor file names
    meta = image_by_path(conn, "img/p1_1.png", "study_id, metadata")
    assert meta == (keyed("uid", "ST-1-0"), {"site": "south"}) and meta[0].startswith("2.25.")


def test_split_assignment_is_deterministic_grouped_and_stratified():
    groups = {f"g{i}": [(i % 3,)] * (1 + i % 4) for i in range(300)}
    a = splits.assign(groups, seed=1)
    assert a == splits.assign(groups, seed=1) and a != splits.assign(groups, seed=2)
    for label in range(3):
        n = {s: sum(len(v) for g, v in groups.items() if a[g] == s and v[0] == (label,)) for s in splits.SPLITS}
        total = sum(n.values())
        assert abs(n["train"] / total - 0.7) < 0.03 and abs(n["test"] / total - 0.2) < 0.03


def test_multi_label_manifest_and_given_splits(conn, tmp_path):
    rng = np.random.default_rng(5)
    rows = []
    for i in range(9):
        Image.fromarray(blob(rng, 30, i % 2)).save(tmp_path / f"x{i}.png")
        rows.append((f"x{i}.png", "effusion;nodule" if i % 3 == 0 else "nodule", ("train", "val", "test")[i % 3]))
    manifest = tmp_path / "m.csv"
    write_manifest(manifest, rows, header=("path", "label", "split"))
    r = archive.ingest_archive(conn, FolderSource(tmp_path, manifest=manifest), "chest", progress=False)
    assert r.added == 9
    got = image_by_path(conn, "x3.png", "split, labels, medsim.label_name(dataset_id, labels)")
    assert got == ("train", [1, 1], "effusion, nodule")
    assert conn.execute("SELECT split_method->>'method' FROM medsim.datasets").fetchone() == ("given",)


def test_crash_mid_ingest_keeps_committed_chunks_and_rerun_completes(conn, tmp_path, monkeypatch):
    root = tmp_path / "archive"
    files = make_folder(root, n_per_label=10)
    real = archive.write_chunk
    calls = []

    def crash_on_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # a kill, as far as the chunk in flight is concerned
        return real(*a, **k)

    monkeypatch.setattr(archive, "write_chunk", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        archive.ingest_archive(conn, FolderSource(root), "mylab", progress=False, chunk=5)
    assert conn.execute("SELECT count(*) FROM medsim.images").fetchone() == (10,)  # two whole chunks
    monkeypatch.setattr(archive, "write_chunk", real)
    r = archive.ingest_archive(conn, FolderSource(root), "mylab", progress=False, chunk=5)
    assert r.added == len(files) - 10 and r.unchanged_files == 10  # the committed chunks' files are not read
    assert conn.execute("SELECT count(DISTINCT sha256), count(*) FROM medsim.images").fetchone() == (21, 21)


def test_archive_images_embed_and_search(conn, tmp_path, db_url):
    """Mixed sizes, colour and 16-bit images go through the worker and search like MedMNIST ones."""
    root = tmp_path / "archive"
    make_folder(root, n_per_label=8)
    archive.ingest_archive(conn, FolderSource(root, max_side=64), "mylab", progress=False)
    mid = register_model(conn)
    embed_all(db_url)
    total = conn.execute("SELECT count(*) FROM medsim.images").fetchone()[0]
    assert conn.execute("SELECT count(*) FROM medsim.embeddings WHERE model_id = %s", (mid,)).fetchone()[0] == total
    tid = conn.execute("SELECT id FROM medsim.images WHERE bit_depth = 16 AND split = 'test' LIMIT 1").fetchone()
    tid = tid[0] if tid else conn.execute("SELECT id FROM medsim.images WHERE bit_depth = 16").fetchone()[0]
    [(q, hits)] = search(conn, image_ids=[tid], k=3)
    assert q.dataset == "mylab" and len(hits) == 3 and q.vector.dtype == np.float32


def test_train_on_an_archive_of_mixed_sizes(conn, tmp_path):
    """An archive is trainable like MedMNIST: images of any size are resized at the network's input."""
    from medsim.training import train

    root = tmp_path / "archive"
    make_folder(root, n_per_label=20)
    archive.ingest_archive(conn, FolderSource(root, max_side=64), "mylab", progress=False)
    lines = []
    mid = train.train(conn, train.TrainConfig(epochs=1, steps_per_epoch=4, per_class=8, val_pairs=40,
                                              flags=["mylab"]), out_dir=tmp_path, progress=False, log=lines.append)
    assert conn.execute("SELECT datasets FROM medsim.models WHERE id = %s", (mid,)).fetchone() == (["mylab"],)
    assert "on mylab:" in lines[0] and "skipped" not in "\n".join(lines)
