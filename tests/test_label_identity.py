"""Issue 22, point 0: "the same diagnosis" means one thing in every split and every dataset.

Archives whose splits hold different label sets (train a/b/c, val b/c, test a/c), a
multi-label archive and a single-class archive, in one model: evaluation's figures must
equal a k-NN the test computes itself from the stored embeddings and the label names in
the database, and training's validation figure must not be the zero it was.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from medsim.sources import archive
from medsim.sources.folder import FolderSource
from medsim.training import data, evaluate, train
from tests.helpers import embed_all, register_model

SPLITS = {"train": ("a", "b", "c"), "val": ("b", "c"), "test": ("a", "c")}


def write(root, rows) -> None:
    """rows: (name, label text, split, grey level): a 16 px image whose brightness and a
    bar's place follow the label, so even an untrained network's neighbours mean something."""
    lines = ["path,label,split"]
    rng = np.random.default_rng(len(rows))
    for name, label, split, level in rows:
        px = np.clip(rng.normal(level, 12, (16, 16)), 0, 255).astype(np.uint8)
        px[:, (level // 16) % 16] = 255
        Image.fromarray(px).save(root / f"{name}.png")
        lines.append(f"{name}.png,{label},{split}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")


@pytest.fixture
def archives(conn, tmp_path, db_url):
    levels = {"a": 40, "b": 120, "c": 200}
    made = {}
    specs = {
        "uneven": [(f"u{s}{i}", lab, s, levels[lab] + i % 5) for s, labs in SPLITS.items()
                   for i in range(30) for lab in [labs[i % len(labs)]]],
        "multi": [(f"m{s}{i}", ";".join(sorted({"x", ("y" if i % 2 else "z")})), s, 60 + 90 * (i % 2) + i % 5)
                  for s in SPLITS for i in range(24)],
        "single": [(f"s{s}{i}", "only", s, 90 + i % 7) for s in SPLITS for i in range(18)],
    }
    for name, rows in specs.items():
        root = tmp_path / name
        root.mkdir()
        write(root, rows)
        archive.ingest_archive(conn, FolderSource(root, manifest=root / "labels.csv"), name, progress=False)
        made[name] = rows
    return made


def stored(conn, model_id: int, dataset: str, split: str):
    rows = conn.execute(
        "SELECT e.embedding::text, medsim.label_names(i.dataset_id, i.labels) FROM medsim.embeddings e "
        "JOIN medsim.images i ON i.id = e.image_id JOIN medsim.datasets d ON d.id = i.dataset_id "
        "WHERE e.model_id = %s AND d.flag = %s AND i.split = %s ORDER BY i.id", (model_id, dataset, split)).fetchall()
    z = np.array([np.array(r[0].strip("[]").split(","), dtype=np.float32) for r in rows])
    return z, [tuple(sorted(r[1])) for r in rows]


def independent(zq, lq, zb, lb, k=5) -> dict:
    """Test queries against the same dataset's train split, L2, the literature's figures."""
    d = ((zq[:, None, :] - zb[None, :, :]) ** 2).sum(-1)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    aps, acc1 = [], []
    for qi, ranked in enumerate(order):
        rel = np.array([lb[j] == lq[qi] for j in ranked], dtype=float)
        hits = rel.sum()
        precision = np.cumsum(rel) / np.arange(1, k + 1)
        aps.append(float((precision * rel).sum() / hits) if hits else 0.0)
        acc1.append(rel[0])
    return {"map@5": float(np.mean(aps)), "acc@1": float(np.mean(acc1))}


def test_evaluation_agrees_with_an_independent_knn_when_splits_differ(conn, archives, db_url, tmp_path):
    mid = register_model(conn)
    conn.execute("UPDATE medsim.models SET datasets = %s WHERE id = %s", (list(archives), mid))
    embed_all(db_url)
    keys = data.load_split(conn, ["train"], list(archives))
    # one key per (dataset, label vector), whatever split it is read from
    val = data.load_split(conn, ["val"], list(archives))
    train_keys = dict(zip(keys.ids.tolist(), keys.label_keys.tolist(), strict=True))
    assert set(val.label_keys) <= set(train_keys.values())
    r = evaluate.evaluate(conn, mid, store=False, out_dir=tmp_path)
    for name in archives:
        zq, lq = stored(conn, mid, name, "test")
        zb, lb = stored(conn, mid, name, "train")
        want = independent(zq, lq, zb, lb)
        got = r["literature"][name]
        assert abs(got["map@5"] - want["map@5"]) < 0.02 and abs(got["acc@1"] - want["acc@1"]) < 0.02, (
            name, got, want)
    assert r["literature"]["single"]["acc@1"] == 1.0  # one class: every neighbour shares it
    assert r["literature"]["uneven"]["acc@1"] > 0.5  # brightness separates a from c


def test_training_selects_on_a_validation_figure_that_is_not_zero(conn, archives):
    """Training's per-epoch figure (val queries against train, mAP@5) for the same archives:
    it was 0.0000 at every epoch on a real archive, which then chose epoch 1."""
    flags = list(archives)
    tr, va = (data.load_split(conn, [s], flags) for s in ("train", "val"))
    cfg = train.TrainConfig(flags=flags, epochs=2, steps_per_epoch=2, per_class=4, seed=0, augment="none",
                            device="cpu")
    _, history, _ = train.fit(tr, va, cfg, "cpu", progress=False, log=lambda *a: None)
    assert all(h["val_map"] > 0.4 for h in history), [h["val_map"] for h in history]
