"""Leakage audit on planted leaks: an exact copy of a train image in test, a near copy
(one pixel changed), and a patient in two splits; evaluation can leave them out."""

from __future__ import annotations

import csv

import numpy as np
from PIL import Image

from medsim import audit, cli
from medsim.sources import archive
from medsim.sources.folder import FolderSource
from medsim.training import evaluate
from tests.helpers import embed_all, ingest_synth, register_model


def plant(conn, source_id: int, split: str, change_pixel: bool) -> int:
    px, h, w, c, ds = conn.execute("SELECT pixels, height, width, channels, dataset_id FROM medsim.images "
                                   "WHERE id = %s", (source_id,)).fetchone()
    px = bytearray(px)
    if change_pixel:
        px[0] = (px[0] + 1) % 256
    import hashlib

    return conn.execute(
        "INSERT INTO medsim.images (dataset_id, split, split_index, labels, height, width, channels, pixels, sha256) "
        "SELECT %s, %s, 90000 + %s, labels, %s, %s, %s, %s, %s FROM medsim.images WHERE id = %s RETURNING id",
        (ds, split, source_id, h, w, c, bytes(px), hashlib.sha256(bytes(px)).digest(), source_id)).fetchone()[0]


def test_audit_finds_planted_leaks_and_evaluation_leaves_them_out(conn, synth_dir, db_url, capsys):
    ingest_synth(conn, synth_dir)
    train_ids = [r[0] for r in conn.execute("SELECT id FROM medsim.images WHERE split = 'train' ORDER BY id LIMIT 2")]
    exact = plant(conn, train_ids[0], "test", change_pixel=False)
    near = plant(conn, train_ids[1], "test", change_pixel=True)
    mid = register_model(conn)
    embed_all(db_url)
    # an untrained network on synthetic blobs puts most images within 1e-6 of each other,
    # so the threshold is given (a real model's default adapts to its own spread)
    assert cli.main(["audit", "--threshold", "1e-5"]) == 0
    out = capsys.readouterr().out
    assert "exact duplicates (same pixels): 1 pairs, 1 across splits" in out
    assert "near duplicates (embedding distance under 1e-05)" in out
    found = conn.execute("SELECT kind, image_a, image_b, across_splits, distance FROM medsim.leakage "
                         "WHERE model_id = %s ORDER BY kind, image_a", (mid,)).fetchall()
    assert ("exact", train_ids[0], exact, True, 0.0) in found
    near_pairs = {(a, b) for kind, a, b, _, _ in found if kind == "near"}
    assert (train_ids[1], near) in near_pairs
    row = conn.execute("SELECT copies, across_splits FROM medsim.exact_duplicates").fetchone()
    assert row == (2, True)
    leaked = evaluate.leaked_test_images(conn, mid, ["breastmnist", "retinamnist"])
    assert {exact, near} <= leaked
    full = evaluate.evaluate(conn, mid, store=False)
    honest = evaluate.evaluate(conn, mid, store=False, exclude_leaked=True)
    assert honest["excluded_leaked_queries"] == len(leaked)
    total = lambda r: sum(m["n_queries"] for m in r["retrieval"].values())  # noqa: E731
    assert total(full) - total(honest) == len(leaked)
    assert "test queries left out as leaked" in evaluate.format_table(honest)


def test_audit_finds_patients_in_two_splits(conn, tmp_path, db_url, monkeypatch):
    monkeypatch.setenv("MEDSIM_PATIENT_KEY", "a test key that is long enough")
    rng = np.random.default_rng(2)
    rows = []
    for i, split in enumerate(["train", "test", "train", "val"]):  # patient A in train and test
        Image.fromarray((rng.random((28, 28)) * 255).astype(np.uint8)).save(tmp_path / f"{i}.png")
        rows.append((f"{i}.png", "x", split, "A" if i < 2 else f"B{i}"))
    with open(tmp_path / "m.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("path", "label", "split", "patient_id"))
        w.writerows(rows)
    archive.ingest_archive(conn, FolderSource(tmp_path, manifest=tmp_path / "m.csv"), "given", progress=False)
    register_model(conn)
    embed_all(db_url)
    r = audit.run(conn)
    assert r["patient_pairs_across_splits"] == 1 and r["exact_pairs"] == 0
    assert conn.execute("SELECT splits, images FROM medsim.patients_in_two_splits").fetchone() == (["test", "train"], 2)
