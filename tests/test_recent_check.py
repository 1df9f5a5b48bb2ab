"""Issue 37: where `medsim calibration check --since DATE` found the diagnosis set covering
recent images less than asked, every place the calibrated numbers are used says so: /status
and `medsim status` per dataset, a search's JSON (API and CLI), the CLI table and the page,
beside the set. A passing check, or a dataset never checked, adds no alarm."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

from medsim.queries import Q
from medsim.training import recent
from tests import test_browser

browser, server = test_browser.browser, test_browser.server  # the page's fixtures: Chromium, `medsim serve`

FAILED = {"n": 40, "verified": False, "since": "2026-01-01T00:00:00+00:00",
          "set": {"5": {"coverage": 0.8, "level": 0.9, "mean_size": 1.2, "n": 40}},
          "verdict": "not verified on recent images: the set covered 80.0% at k = 5 of 40 images ingested "
                     "since 2026-01-01 (asked 90%)", "checked_at": "2026-02-03T10:00:00+00:00"}


def test_the_note_is_said_only_for_a_check_that_fell_short():
    assert recent.note(None, "breastmnist") is None and recent.summary(None) is None
    assert recent.note({"n": 0, "verdict": "no labelled breastmnist image ingested since 2026-01-01"},
                       "breastmnist") is None  # no check was possible: nothing to alarm about
    assert recent.note({**FAILED, "verified": True, "verdict": "verified on recent images"}, "breastmnist") is None
    said = recent.note(FAILED, "breastmnist")
    assert said == f"breastmnist: {FAILED['verdict']}; checked 2026-02-03"
    s = recent.summary(FAILED)
    assert s["verified"] is False and s["coverage"] == 0.9 and s["since"] == FAILED["since"]
    assert s["checked_at"] == FAILED["checked_at"] and s["n"] == 40


def failed_check(conn, mid, tmp_path):
    """A fit, then the breast test images relabelled after it (labels swapped: a drifted
    archive) -> the real check, stored, says breast is not verified; retina is not checked."""
    from medsim.training import evaluate, recheck

    evaluate.evaluate(conn, mid, out_dir=tmp_path)
    conn.execute("UPDATE medsim.images SET created_at = now() - interval '10 days'")
    conn.execute("UPDATE medsim.images i SET created_at = now(), labels = ARRAY[1 - i.labels[1]]::smallint[] "
                 "FROM medsim.datasets d WHERE d.id = i.dataset_id AND d.flag = 'breastmnist' AND i.split = 'test'")
    r = recheck.check(conn, mid, datetime.now(timezone.utc) - timedelta(days=1))
    assert r["datasets"]["breastmnist"]["verified"] is False
    return r["datasets"]["breastmnist"]["verdict"]


def first_test_image(conn, flag: str) -> int:
    return conn.execute("SELECT min(i.id) FROM medsim.images i JOIN medsim.datasets d ON d.id = i.dataset_id "
                        "WHERE d.flag = %s AND i.split = 'test'", (flag,)).fetchone()[0]


def test_status_search_json_and_the_cli_say_not_verified_on_recent_images(embedded, db_url, tmp_path, capsys):
    from fastapi.testclient import TestClient

    from medsim import cli
    from medsim.service.app import create_app
    from medsim.service.state import ServeConfig

    conn, mid = embedded
    verdict = failed_check(conn, mid, tmp_path)
    note = f"breastmnist: {verdict}; checked {datetime.now(timezone.utc):%Y-%m-%d}"
    breast, retina = first_test_image(conn, "breastmnist"), first_test_image(conn, "retinamnist")
    with TestClient(create_app(ServeConfig(auth=False, database_url=db_url))) as client:
        rows = {r["dataset"]: r for r in client.get("/status").json() if r["model_id"] == mid}
        b = rows["breastmnist"]
        assert b["recent_check"]["verified"] is False and b["recent_check"]["verdict"] == verdict
        assert b["recent_check"]["coverage"] == 0.9 and b["recent_check"]["checked_at"]
        assert b["calibration_note"] == note
        assert rows["retinamnist"]["recent_check"] is None and rows["retinamnist"]["calibration_note"] is None
        body = client.post("/search", json={"image_id": breast, "k": 5}).json()
        assert body["calibration_note"] == note
        assert client.post("/search", json={"image_id": retina, "k": 5}).json()["calibration_note"] is None

    assert cli.main(["search", "--image-id", str(breast), "-k", "5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["calibration_note"] == note
    assert cli.main(["search", "--image-id", str(breast), "-k", "5"]) == 0
    assert f"  calibration: {note}" in capsys.readouterr().out.splitlines()
    assert cli.main(["search", "--image-id", str(retina), "-k", "5"]) == 0
    assert "not verified" not in capsys.readouterr().out
    assert cli.main(["status"]) == 0
    assert f"model {mid} {note}" in capsys.readouterr().out.splitlines()

    # a later check that passes (stored as the real check stores it) clears the alarm everywhere
    passed = {**FAILED, "verified": True, "verdict": "verified on recent images"}
    conn.execute(Q.store_calibration_check, {"model_id": mid, "dataset": "breastmnist", "check": json.dumps(passed)})
    with TestClient(create_app(ServeConfig(auth=False, database_url=db_url))) as client:
        b = next(r for r in client.get("/status").json() if r["model_id"] == mid and r["dataset"] == "breastmnist")
        assert b["recent_check"]["verified"] is True and b["calibration_note"] is None
        assert client.post("/search", json={"image_id": breast, "k": 5}).json()["calibration_note"] is None
    assert cli.main(["search", "--image-id", str(breast), "-k", "5"]) == 0
    assert "not verified" not in capsys.readouterr().out


def test_a_user_who_sees_retina_only_hears_nothing_of_breast_s_check(embedded, db_url, tmp_path):
    """/status lists checks through the caller's role: a dataset not granted is not named."""
    from fastapi.testclient import TestClient

    from medsim import access
    from medsim.service.app import create_app
    from medsim.service.state import ServeConfig

    conn, mid = embedded
    failed_check(conn, mid, tmp_path)
    access.add_user(conn, "retina")
    access.grant(conn, "retina", ["retinamnist"])
    token = access.create_token(conn, "retina")[0]
    with TestClient(create_app(ServeConfig(database_url=db_url))) as client:
        rows = client.get("/status", headers={"Authorization": f"Bearer {token}"}).json()
    assert rows and {r["dataset"] for r in rows} == {"retinamnist"}
    assert all(r["calibration_note"] is None for r in rows)


def test_the_page_shows_the_note_beside_the_set_and_in_the_status_panel(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    base, conn, (token, _) = server
    mid = conn.execute("SELECT id FROM medsim.models WHERE is_current").fetchone()[0]
    verdict = failed_check(conn, mid, tmp_path)
    breast, retina = first_test_image(conn, "breastmnist"), first_test_image(conn, "retinamnist")
    wait = test_browser.open_search(browser, f"{base}/?image_id={breast}&k=5", token, 5)
    shown = browser.find_element(By.ID, "calibration-note")
    assert shown.is_displayed() and shown.text.startswith(f"Calibration breastmnist: {verdict}")
    assert (v := test_browser.axe_violations(browser)) == [], v

    browser.find_element(By.ID, "status-btn").click()
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-panel") == "status")
    said = [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#status-calibration li")]
    assert len(said) == 1 and said[0].startswith(f"model {mid} breastmnist: {verdict}")
    browser.find_element(By.ID, "status-close").click()

    browser.get(f"{base}/?image_id={retina}&k=5")  # a dataset never checked: no note
    wait.until(lambda d: d.find_element(By.ID, "summary").text.startswith("5 nearest"))
    assert not browser.find_element(By.ID, "calibration-note").is_displayed()
