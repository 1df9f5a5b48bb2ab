"""Calibrated answers: the logistic fits, the ECE, and the numbers every search returns."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from medsim.search import pipeline, present
from medsim.search.context import Context
from medsim.search.request import ById, Request
from medsim.training import calibration, evaluate


def test_the_logistic_fit_recovers_known_parameters_and_is_calibrated():
    rng = np.random.default_rng(0)
    d = rng.uniform(0, 1, 20_000)
    y = rng.random(20_000) < calibration.sigmoid(3.0, -8.0, d)
    a, b = calibration.fit_logistic(d, y)
    assert a == pytest.approx(3.0, abs=0.25) and b == pytest.approx(-8.0, abs=0.6)
    e, bins = calibration.ece(calibration.sigmoid(a, b, d), y)
    assert e < 0.02 and sum(n for _, _, n in bins) == len(d)
    # a deliberately wrong mapping is measured as badly calibrated
    e_bad, _ = calibration.ece(calibration.sigmoid(0.0, 0.0, d), y)
    assert e_bad > 0.1
    # separable data stays finite (the ridge)
    a, b = calibration.fit_logistic(np.array([0.1, 0.2, 0.8, 0.9]), np.array([1, 1, 0, 0]))
    assert math.isfinite(a) and math.isfinite(b) and b < 0


def test_evaluate_fits_stores_and_searches_return_calibrated_numbers(embedded, tmp_path, db_url):
    from medsim.training import train
    from tests.helpers import embed_all

    conn, _ = embedded
    # a briefly trained model: an untrained one maps every image to nearly one point, where
    # distances are float noise and "unlike anything on file" would be noise too
    mid = train.train(conn, train.TrainConfig(epochs=2, steps_per_epoch=6, per_class=8, device="cpu", seed=0),
                      out_dir=tmp_path, progress=False, log=lambda *a: None, set_current=True)
    embed_all(db_url)
    r = evaluate.evaluate(conn, mid, out_dir=tmp_path)
    cal = r["calibration"]
    assert set(cal) == {"breastmnist", "retinamnist"}
    for c in cal.values():
        assert 0 <= c["ece_val"] <= 1 and 0 <= c["ece_test"] <= 1 and c["n_val_pairs"] > 0
        assert sum(n for _, _, n in c["reliability_test"]) == c["n_test_pairs"]
    png = next(c["diagram_png"] for c in cal.values() if c.get("diagram_png"))
    assert (tmp_path / f"model-{mid}" / "reliability.png").exists() and png.endswith("reliability.png")
    assert (tmp_path / f"model-{mid}" / "reliability-by-k.png").stat().st_size > 10_000  # one panel per dataset
    stored = conn.execute("SELECT dataset, a, b, report FROM medsim.calibrations WHERE model_id = %s ORDER BY dataset",
                          (mid,)).fetchall()
    assert [s[0] for s in stored] == ["breastmnist", "retinamnist"]
    assert stored[0][3]["ece_test"] == pytest.approx(cal["breastmnist"]["ece_test"])
    # every neighbour carries P(same), and the SQL function agrees with Python
    # a breast test query that is like what validation saw (by the stored rule; this
    # untrained model's distances are tiny, so about 1% are not)
    for (gid,) in conn.execute("SELECT image_id FROM medsim.query_images WHERE dataset = 'breastmnist' "
                               "ORDER BY image_id LIMIT 20").fetchall():
        result = pipeline.run(Context(conn), Request(ById(gid), k=6))
        if not result.query.vote["unlike_anything_on_file"] and not result.query.vote["tie"]:
            break
    q, hits = result.query, result.hits
    a, b = stored[0][1], stored[0][2]
    for h in hits:
        if h.same_label is False:  # a label known to differ: no P(same) beside it (issue 37)
            assert h.p_same is None
            continue
        assert h.p_same is not None and 0 <= h.p_same <= 1
        assert h.p_same == pytest.approx(calibration.sigmoid(*[s[1:3] for s in stored if s[0] == h.dataset][0],
                                                             h.distance))
    sql = conn.execute("SELECT s.image_id, medsim.p_same_label(NULL, s.dataset, s.distance) "
                       "FROM medsim.similar_images(%s, 6, NULL, NULL, '{\"split\": [\"train\", \"val\"]}', true) s",
        (gid,)).fetchall()
    assert [round(p, 9) for (_, p), h in zip(sql, hits, strict=True) if h.p_same is not None] == \
        [round(h.p_same, 9) for h in hits if h.p_same is not None]
    assert conn.execute("SELECT medsim.p_same_label(NULL, 'nosuch', 0.1)").fetchone()[0] is None
    # a distance of 0 is at least as likely the same diagnosis as the farthest neighbour
    assert calibration.sigmoid(a, b, 0.0) >= calibration.sigmoid(a, b, 2.0) or b > 0
    # the query's vote: a label of its dataset, a confidence in [0, 1]
    assert q.vote["dataset"] == "breastmnist" and q.vote["confidence"] is not None, str(q.vote)
    assert not q.vote["unlike_anything_on_file"] and q.vote["no_confidence_because"] is None
    # what is not like the archive: a CT slice from pydicom's samples, and noise
    import pydicom
    from PIL import Image

    from medsim.search.request import ByFile

    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)).save(noise)
    ct = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"
    for f in (ct, noise):
        other = pipeline.run(Context(conn), Request(ByFile(str(f)), k=8))
        assert other.query.vote["unlike_anything_on_file"] and other.query.vote["confidence"] is None, f
    # the rule flags ~1% of queries like validation's; on this synthetic archive the 99th
    # percentile is estimated from 78 / 120 validation queries (the 2nd-largest nearest
    # distance, itself anywhere between the 96th and 99.7th percentile), so a test share of
    # a few percent is the estimate's noise; it was 6.3% on retina on one machine (torch's
    # training numerics differ between CPUs), where the bound used to be 5%
    assert all(c["ood_share_test"] <= 0.10 for c in cal.values()), {f: c["ood_share_test"] for f, c in cal.items()}
    assert all(set(c["by_k_test"]) == {"1", "5", "10", "20", "50"} for c in cal.values())
    assert 0 <= q.vote["confidence"] <= 1 and q.vote["calibrated_at_k"] == 6
    assert q.vote["votes"] <= q.vote["of"] <= 6
    out = present.as_json([result])[0]
    assert out["vote"]["label_name"] == q.vote["label_name"] and "p_same" in out["neighbours"][0]
    assert ("P(same)" in present.table([result]) or all(h.same_label is False for h in hits)) \
        and "vote:" in present.table([result])
    # a stored query's label is known: the table says whether the vote got it
    verdict = "-> right" if q.vote["label_name"] == q.label_name else f"-> wrong (it is {q.label_name})"
    assert verdict in present.table([result])
    # the reader role may call the function
    with conn.transaction():
        conn.execute("SET LOCAL ROLE medsim_reader")
        assert conn.execute("SELECT medsim.p_same_label(NULL, 'breastmnist', 0.1)").fetchone()[0] is not None
    json.dumps(r)  # the stored evaluation is JSON


def test_the_http_answer_carries_the_calibration(embedded, db_url, tmp_path):
    from fastapi.testclient import TestClient

    from medsim.service.app import create_app
    from medsim.service.state import ServeConfig

    conn, mid = embedded
    gid = conn.execute("SELECT min(image_id) FROM medsim.gallery").fetchone()[0]
    with TestClient(create_app(ServeConfig(auth=False, database_url=db_url))) as client:
        body = client.post("/search", json={"image_id": gid, "k": 4}).json()
        assert body["vote"] is None and all(n["p_same"] is None for n in body["neighbours"])  # not fitted yet
        evaluate.evaluate(conn, mid, out_dir=tmp_path)
        client.app.state.service.cals.clear()  # (the service re-reads them every 30 s)
        body = client.post("/search", json={"image_id": gid, "k": 4}).json()
        assert all(0 <= n["p_same"] <= 1 if n["same_label"] is not False and not body["vote"]["unlike_anything_on_file"]
                   else n["p_same"] is None for n in body["neighbours"])
        v = body["vote"]
        assert v["of"] >= 1
        # this untrained model's distances are float noise, so the query may be "unlike
        # anything on file": then no number, and the sentence saying why
        assert (0 <= v["confidence"] <= 1) if v["confidence"] is not None else (
            v["unlike_anything_on_file"] and v["no_confidence_because"].startswith("unlike anything on file"))
