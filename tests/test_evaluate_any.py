"""Issue 35: any labelled dataset on file is evaluated and calibrated, trained on or not, so
its searches carry P(right); one that cannot be says why; models side by side
(`medsim models compare`, GET /models/compare)."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from medsim import access, cli
from medsim.search import pipeline
from medsim.search.context import Context
from medsim.search.request import ById, Request
from medsim.service.app import create_app
from medsim.service.state import ServeConfig
from medsim.sources import archive
from medsim.sources.folder import FolderSource
from medsim.training import evaluate
from tests.helpers import embed_all, register_model


def write_folder(root, n: int, seed: int, labels=("normal", "effusion"), splits=None):
    """A labelled folder archive: each label a bright blob at its own height (learnable),
    PATH/<label>/<i>.png, or a manifest with a split column when `splits` cycles through
    split names."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28]
    lines = ["path,label,split"]
    for i in range(n):
        k = i % len(labels)
        cy = 7 + 14 * k / max(len(labels) - 1, 1)
        img = 0.15 + 0.7 * np.exp(-((yy - cy) ** 2 + (xx - 14) ** 2) / 18.0) + rng.normal(0, 0.05, (28, 28))
        (root / labels[k]).mkdir(parents=True, exist_ok=True)
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(root / labels[k] / f"{i}.png")
        if splits:
            lines.append(f"{labels[k]}/{i}.png,{labels[k]},{splits[i % len(splits)]}")
    if splits:
        (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


def ingest(conn, root, name: str) -> None:
    manifest = root / "labels.csv"
    archive.ingest_archive(conn, FolderSource(root, manifest=manifest if manifest.exists() else None), name,
                           progress=False)


def ids_of(conn, flag: str, split: str) -> list[int]:
    return [r[0] for r in conn.execute("SELECT i.id FROM medsim.images i JOIN medsim.datasets d ON d.id = i.dataset_id "
                                       "WHERE d.flag = %s AND i.split = %s ORDER BY i.id", (flag, split))]


def table_rows(out: str) -> dict[int, str]:
    """`medsim models compare`'s first line of each model, by model id."""
    return {int(line.lstrip("* ").split()[0]): line for line in out.splitlines()
            if line.strip() and line.lstrip("* ").split()[0].isdigit()}


def votes(conn, image_ids, k: int = 10) -> list[dict]:
    ctx = Context(conn)
    return [pipeline.run(ctx, Request(ById(i), k=k)).query.vote for i in image_ids]


@pytest.fixture
def cxr(conn, db_url, tmp_path, monkeypatch):
    """A labelled folder archive (default splits: train, val and test) that no model was
    trained on (the current model's training datasets are not even on file), embedded.
    The worker embeds with torch, as evaluation does, so the distances a search sees are
    the ones the calibration was fitted on (an untrained model's are small)."""
    monkeypatch.setenv("MEDSIM_RUNTIME", "torch")
    ingest(conn, write_folder(tmp_path / "cxr", 90, seed=0), "cxr")
    mid = register_model(conn)
    return conn, mid


def test_an_archive_no_model_was_trained_on_is_calibrated_and_its_searches_carry_p_right(cxr, db_url, tmp_path,
                                                                                        capsys):
    conn, mid = cxr
    embed_all(db_url)
    tests = ids_of(conn, "cxr", "test")
    assert len(tests) >= 10 and ids_of(conn, "cxr", "val")
    # the model is calibrated for what it was trained on, as `medsim train` + `medsim evaluate` leave it
    conn.execute("INSERT INTO medsim.calibrations (model_id, dataset, a, b, vote_a, vote_b, report) "
                 "VALUES (%s, 'breastmnist', 2, -3, 1, 1, '{}')", (mid,))
    before = votes(conn, tests[:3])
    assert all(v["confidence"] is None and "no calibration for cxr" in v["no_confidence_because"] for v in before)

    assert cli.main(["evaluate", "--datasets", "cxr", "--out-dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert f"model {mid} (default, label mode) on cxr (trained on breastmnist, retinamnist)" in out
    r = evaluate.latest(conn, mid)
    assert r["datasets"] == ["cxr"] and set(r["literature"]) == {"cxr"} and set(r["calibration"]) == {"cxr"}
    lit = r["literature"]["cxr"]
    assert lit["n_queries"] == len(tests) and 0 <= lit["map@5"] <= 1 and 0 <= lit["acc@1"] <= 1
    assert conn.execute("SELECT count(*) FROM medsim.calibrations WHERE model_id = %s AND dataset = 'cxr'",
                        (mid,)).fetchone()[0] == 1

    after = votes(conn, tests)
    assert all(v["dataset"] == "cxr" for v in after)
    calibrated = [i for i, v in zip(tests, after, strict=True) if v["confidence"] is not None]
    # a test query past the 99th percentile of val and train's nearest is "unlike anything"
    assert len(calibrated) >= len(tests) // 2, [v["no_confidence_because"] for v in after]
    assert all(0 < v["confidence"] < 1 for v in after if v["confidence"] is not None)
    assert cli.main(["search", "--image-id", str(calibrated[0]), "-k", "10"]) == 0
    shown = capsys.readouterr().out
    assert "calibrated P(right)" in shown and "no calibration for cxr" not in shown


def test_a_dataset_without_labels_a_val_split_or_test_queries_is_one_sentence(cxr, db_url, tmp_path, capsys):
    conn, mid = cxr
    ingest(conn, write_folder(tmp_path / "noval", 30, seed=1, splits=("train", "train", "test")), "noval")
    ingest(conn, write_folder(tmp_path / "notest", 30, seed=2, splits=("train", "train", "val")), "notest")
    ingest(conn, write_folder(tmp_path / "ct", 30, seed=3, labels=("CT",)), "ct")  # one label: a PACS by Modality
    ingest(conn, write_folder(tmp_path / "bare", 30, seed=4), "bare")
    conn.execute("UPDATE medsim.images i SET labels = '{}' FROM medsim.datasets d "
                 "WHERE d.id = i.dataset_id AND d.flag = 'bare'")  # a source that gave no labels at all
    embed_all(db_url)

    # the default: every dataset the model has embeddings for (and those it was trained on)
    assert cli.main(["evaluate", "--out-dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    sentences = {
        "noval": "noval is not evaluated: it has no val split to fit the calibration on",
        "notest": "notest is not evaluated: it has no test queries (no image in its test split)",
        "bare": "bare is not evaluated: its images carry no labels, so there is no diagnosis to retrieve or calibrate",
        "breastmnist": "breastmnist is not evaluated: no dataset of that name is on file",
    }
    for s in sentences.values():
        assert s in out.splitlines(), (s, out[:2000])
    r = evaluate.latest(conn, mid)
    # one label on every image is still a diagnosis (every vote for it is right, and P(right) says so)
    assert r["datasets"] == ["ct", "cxr"] and set(r["calibration"]) == {"ct", "cxr"}
    assert r["not_evaluated"] == {**sentences,
                                  "retinamnist": "retinamnist is not evaluated: no dataset of that name is on file"}

    # asked for by name, alone: nothing to evaluate is one error naming why (exit 2)
    assert cli.main(["evaluate", "--datasets", "noval", "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"medsim: error: nothing to evaluate for model {mid}: {sentences['noval']}"
    # and beside one that can be, the other is still evaluated
    r = evaluate.evaluate(conn, datasets=["noval", "cxr"], out_dir=tmp_path / "out")
    assert r["datasets"] == ["cxr"] and r["not_evaluated"] == {"noval": sentences["noval"]}
    # a single-label archive alone has no pairs to tell apart, and is evaluated all the same
    r = evaluate.evaluate(conn, datasets=["ct"], out_dir=tmp_path / "out")
    assert r["pairs"] == {} and r["literature"]["ct"]["acc@1"] == 1.0 and set(r["calibration"]) == {"ct"}


def test_models_compare_lists_every_model_with_its_figures_and_dashes_where_none(cxr, db_url, tmp_path, capsys):
    from medsim.training import compare

    conn, m1 = cxr
    m2 = register_model(conn, current=False, seed=1)
    embed_all(db_url)  # the current model's gallery; m2 has none
    evaluate.evaluate(conn, m1, datasets=["cxr"], out_dir=tmp_path / "out")

    c = compare.run(conn)
    by_id = {m.id: m for m in c.models}
    assert list(by_id) == [m1, m2]
    a, b = by_id[m1], by_id[m2]
    (da,), (db,) = a.by_dataset, b.by_dataset
    assert da.dataset == db.dataset == "cxr" and da.images == db.images == 90
    assert da.embedded == 90 and da.coverage == 1.0 and db.embedded == 0 and db.coverage == 0.0
    stored = evaluate.latest(conn, m1)
    assert da.map5 == pytest.approx(stored["literature"]["cxr"]["map@5"]) and da.evaluation_id == stored["evaluation_id"]
    assert da.acc1 == pytest.approx(stored["literature"]["cxr"]["acc@1"])
    assert da.ece == pytest.approx(stored["calibration"]["cxr"]["ece_test"])
    assert db.map5 is db.acc1 is db.ece is None and not b.evaluated and a.evaluated
    for m in (a, b):
        assert m.input_size == 28 and m.checkpoint_bytes > 10_000 and m.ms_per_image > 0 and m.runtime
    assert "90 stored images" in c.timing

    assert cli.main(["models", "compare"]) == 0
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert set(rows) == {m1, m2} and rows[m1].startswith("*")
    assert f"{da.map5:.1%}" in rows[m1] and "90/90 100.0%" in rows[m1]
    assert rows[m2].split()[-6:] == ["-", "-", "-", "-", "0/90", "0.0%"]
    # m2 was trained on datasets not on file and has no embeddings: its plain default would not reach cxr
    assert f"'-': no stored evaluation of that dataset; `medsim evaluate --model {m2} --datasets cxr` fills it" in out
    assert f"--model {m1}" not in out
    # a model whose own default (trained on, embedded) covers its '-' gets the plain command
    seen = compare.ModelFigures(7, "x", False, ["cxr"], 28, 1, by_dataset=[compare.DatasetFigures("cxr", 90, 0)])
    assert compare.fill_commands([seen], {}) == ["medsim evaluate --model 7"]
    assert compare.fill_commands([seen], {"cxr": "cxr is not evaluated: ..."}) == []
    assert cli.main(["models", "compare", str(m2), "--no-timing"]) == 0
    assert set(table_rows(capsys.readouterr().out)) == {m2}
    assert cli.main(["models", "compare", "999"]) == 2
    assert "no model with id 999" in capsys.readouterr().err

    # over HTTP: an admin's token only
    tokens = {}
    for user, scope in (("boss", "admin"), ("viewer", "images"), ("searcher", "search")):
        access.add_user(conn, user)
        access.grant(conn, user, [], every=True)
        tokens[user] = access.create_token(conn, user, scope)[0]
    with TestClient(create_app(ServeConfig(database_url=db_url, auth=True))) as client:
        for user in ("viewer", "searcher"):
            r = client.get("/models/compare", headers={"Authorization": f"Bearer {tokens[user]}"})
            assert r.status_code == 403, r.text
            assert "comparing models needs a token with scope admin" in r.json()["detail"]
        assert client.get("/models/compare").status_code == 401
        r = client.get(f"/models/compare?model={m1}&model={m2}&timing=false",
                       headers={"Authorization": f"Bearer {tokens['boss']}"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert [m["id"] for m in body["models"]] == [m1, m2] and body["timing"] is None
        got = {m["id"]: m["by_dataset"][0] for m in body["models"]}
        assert got[m1]["map5"] == pytest.approx(da.map5) and got[m1]["coverage"] == 1.0
        assert got[m2]["map5"] is None and got[m2]["embedded"] == 0
        assert body["to_fill"] == [f"medsim evaluate --model {m2} --datasets cxr"] and body["not_evaluable"] == {}
        r = client.get(f"/models/compare?model={m2}", headers={"Authorization": f"Bearer {tokens['boss']}"})
        assert r.status_code == 200 and r.json()["models"][0]["ms_per_image"] > 0
        assert client.get("/models/compare?model=999&timing=false",
                          headers={"Authorization": f"Bearer {tokens['boss']}"}).status_code == 404
