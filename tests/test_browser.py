"""The web page in a real browser: headless Chromium (Debian's chromium + chromium-driver,
driven by Selenium; nothing is downloaded) against a running `medsim serve`.

Skips, naming the packages, where no Chromium is installed; `.ci/run` installs them and
sets MEDSIM_REQUIRE_BROWSER=1, so in CI a missing browser fails instead. The page's
screenshots are kept in test-artifacts/ (or $MEDSIM_ARTIFACTS).
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("MEDSIM_ARTIFACTS", ROOT / "test-artifacts"))


def find_browser() -> tuple[str, str] | None:
    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
                   None)
    driver = shutil.which("chromedriver") or next(
        (p for p in ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver") if os.path.exists(p)), None)
    return (browser, driver) if browser and driver else None


@pytest.fixture
def browser():
    found = find_browser()
    if found is None:
        msg = "no Chromium: apt-get install -y chromium chromium-driver"
        if os.environ.get("MEDSIM_REQUIRE_BROWSER"):
            pytest.fail(msg + " (MEDSIM_REQUIRE_BROWSER is set)")
        pytest.skip(msg)
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never fetch a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = found[0]
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1366,900",
              "--disable-gpu"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(found[1]), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(embedded, db_url, tmp_path):
    """`medsim serve` as a newcomer runs it (tokens required) -> (base URL, conn, a token
    of a user who sees every dataset, one of a user who sees retinamnist only)."""
    from medsim import access

    conn = embedded[0]
    tokens = []
    for name, grants in (("viewer", None), ("retina", ["retinamnist"])):
        access.add_user(conn, name)
        access.grant(conn, name, grants or [], every=grants is None)
        tokens.append(access.create_token(conn, name)[0])
    port = free_port()
    with open(tmp_path / "serve.log", "w+") as log:
        proc = subprocess.Popen([sys.executable, "-m", "medsim.cli", "serve", "--port", str(port)],
                                env={**os.environ, "DATABASE_URL": db_url, "PYTHONUNBUFFERED": "1"},
                                stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 60
            while True:
                try:
                    with urllib.request.urlopen(base + "/healthz", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if proc.poll() is not None or time.time() > deadline:
                    log.seek(0)
                    pytest.fail(f"medsim serve did not come up:\n{log.read()}")
                time.sleep(0.3)
            yield base, conn, tokens
        finally:
            proc.terminate()
            proc.wait(timeout=20)


def sign_in(browser, wait, token: str) -> None:
    """The page asks for a token once (401 from the API), then loads the user's datasets."""
    from selenium.webdriver.common.by import By

    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
    assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-auth") == "needed"
    assert browser.find_element(By.ID, "login").get_attribute("hidden") is None
    box = browser.find_element(By.ID, "token")
    box.send_keys(token + "\n")
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-auth") == "ok")
    assert browser.find_element(By.ID, "login").get_attribute("hidden") is not None


def open_search(browser, url: str, token: str, cards: int):
    """A search's URL opened, the token given, and its cards drawn -> the WebDriverWait."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url)
    wait = WebDriverWait(browser, 30)
    sign_in(browser, wait, token)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#grid .card")) == cards)
    return wait


def test_upload_then_click_a_neighbour(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    base, conn, (token, _) = server
    # a real image file: a stored test image written out as PNG
    tid, data = conn.execute("SELECT id, pixels FROM medsim.images WHERE split = 'test' ORDER BY id LIMIT 1").fetchone()
    path = tmp_path / "query.png"
    Image.fromarray(np.frombuffer(data, np.uint8).reshape(28, 28)).save(path)

    browser.get(base + "/?k=8")
    wait = WebDriverWait(browser, 30)
    sign_in(browser, wait, token)
    browser.find_element(By.ID, "file").send_keys(str(path))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#grid .card")) == 8)
    cards = browser.find_elements(By.CSS_SELECTOR, "#grid .card")
    labels = [c.find_element(By.CSS_SELECTOR, ".label").text for c in cards]
    assert all(labels), labels
    known = {r[0] for r in conn.execute(
        "SELECT DISTINCT medsim.label_name(dataset_id, labels) FROM medsim.images").fetchall()}
    assert set(labels) <= known
    assert all("distance" in c.find_element(By.CSS_SELECTOR, ".dist").text for c in cards)
    # every thumbnail actually loaded (rendered from the pixels in Postgres)
    wait.until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#grid img')].every(i => i.complete && i.naturalWidth > 0)"))
    assert browser.find_element(By.ID, "error").get_attribute("hidden") is not None
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "serve-upload.png"))

    # click the second neighbour: it opens beside the query (its own URL); "Search from this
    # image" then searches from it, its id in the URL
    target = cards[1].get_attribute("data-image-id")
    before = browser.find_element(By.TAG_NAME, "body").get_attribute("data-searches")
    cards[1].click()
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-viewing") == target)
    assert f"view={target}" in browser.current_url
    assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-searches") == before  # a click never searches
    browser.find_element(By.ID, "search-from").click()
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-searches") != before)
    assert not browser.find_element(By.ID, "viewer").get_attribute("open")
    assert f"image_id={target}" in browser.current_url
    assert browser.find_element(By.ID, "query-title").text.startswith(f"image {target}")
    new_ids = [c.get_attribute("data-image-id") for c in browser.find_elements(By.CSS_SELECTOR, "#grid .card")]
    assert len(new_ids) == 8 and target not in new_ids  # a stored query is never its own neighbour
    expected = [str(r[0]) for r in conn.execute("SELECT image_id FROM medsim.similar_images(%s, 8)",
                                                (int(target),)).fetchall()]
    assert new_ids == expected
    # same-label marks agree with the labels shown
    qlabel = browser.find_element(By.ID, "query-title").text.split(": ", 1)[1]
    for c in browser.find_elements(By.CSS_SELECTOR, "#grid .card"):
        assert ("same" in c.get_attribute("class").split()) == (
            c.find_element(By.CSS_SELECTOR, ".label").text == qlabel)
    browser.save_screenshot(str(ARTIFACTS / "serve-click.png"))

    # the URL alone reproduces the result (bookmark / share), with k and a filter
    browser.get(f"{base}/?image_id={target}&k=4&dataset=retinamnist")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#grid .card")) == 4)
    assert {c.find_element(By.CSS_SELECTOR, ".where").text.split(" · ")[0]
            for c in browser.find_elements(By.CSS_SELECTOR, "#grid .card")} == {"retinamnist"}
    # nothing overlaps: each card's text stays inside its card
    overflow = browser.execute_script("""
        return [...document.querySelectorAll('#grid .card .body > *')].filter(e => {
            const c = e.closest('.card').getBoundingClientRect(), r = e.getBoundingClientRect();
            return r.right > c.right + 1 || r.left < c.left - 1; }).length""")
    assert overflow == 0
    # a bad id is reported on the page, not in the console
    box = browser.find_element(By.ID, "image-id")
    box.clear()
    box.send_keys("987654321\n")
    wait.until(lambda d: d.find_element(By.ID, "error").get_attribute("hidden") is None)
    assert "no image with id 987654321" in browser.find_element(By.ID, "error").text


def test_the_token_flow_and_what_a_restricted_user_sees(server, browser):
    """A wrong token is refused on the page; the token lasts for the tab (a reload does not
    ask again); a user granted one dataset sees only it; "forget token" asks again; and the
    page breaks no rule of its Content-Security-Policy."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    base, conn, (viewer, retina_only) = server
    wait = WebDriverWait(browser, 30)
    browser.get(base + "/")
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-auth") == "needed")
    box = browser.find_element(By.ID, "token")
    box.send_keys("not a token\n")
    assert "looks like msm_" in browser.find_element(By.ID, "login-why").text
    box.clear()
    box.send_keys(viewer[:-3] + "abc\n")  # the right shape, a wrong secret: the API's 401 sentence
    wait.until(lambda d: "not valid" in d.find_element(By.ID, "login-why").text)

    sign_in_again = retina_only
    box.clear()
    box.send_keys(sign_in_again + "\n")
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-auth") == "ok")
    options = [o.get_attribute("value") for o in browser.find_elements(By.CSS_SELECTOR, "#dataset option")]
    assert options == ["", "retinamnist"]
    browser.find_element(By.ID, "random").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#grid .card")) == 8)
    wait.until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#grid img')].every(i => i.complete && i.naturalWidth > 0)"))
    where = {c.find_element(By.CSS_SELECTOR, ".where").text.split(" · ")[0]
             for c in browser.find_elements(By.CSS_SELECTOR, "#grid .card")}
    assert where == {"retinamnist"}
    logged = conn.execute("SELECT action, count(*) FROM medsim.access_log WHERE user_name = 'retina' "
                          "GROUP BY action ORDER BY action").fetchall()
    assert logged == [("search", 1), ("thumbnail", 9)], logged  # 8 neighbours and the query

    browser.refresh()  # the same tab: no second prompt
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-auth") == "ok")
    browser.find_element(By.ID, "logout").click()
    assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-auth") == "needed"
    assert browser.execute_script("return sessionStorage.getItem('medsim.token')") is None
    violations = [e["message"] for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]
    assert violations == []


def test_the_api_page_works_offline_under_the_same_policy(server, browser):
    """/docs is Swagger UI from files medsim serves itself: no CDN, no inline script."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    base = server[0]
    browser.get(base + "/docs")
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".swagger-ui .opblock"))
    assert "/search" in browser.find_element(By.CSS_SELECTOR, ".swagger-ui").text
    assert browser.find_elements(By.CSS_SELECTOR, ".swagger-ui .authorize")  # where a token goes
    errors = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not [m for m in errors if "Content Security Policy" in m or "http" in m.split(" ")[0]], errors


def test_start_page_loading_state_superseded_search_and_errors(server, browser):
    """Before any search: no empty query box, no broken image. A slow search shows
    "Searching…" at once (in the same task as the click) and dims the old results; a
    second search cancels the first, whose answer never replaces the newer one; an error
    clears the results; going back to a URL without a query shows nothing stale."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    base, conn, (token, _) = server
    a, b = (r[0] for r in conn.execute("SELECT id FROM medsim.images WHERE split = 'test' ORDER BY id LIMIT 2"))
    browser.get(base + "/")
    wait = WebDriverWait(browser, 30)
    sign_in(browser, wait, token)
    shown = browser.execute_script("""
        const q = document.getElementById('query');
        return {query: getComputedStyle(q).display,
                broken: [...document.images].filter(i => i.offsetParent !== null && !(i.complete && i.naturalWidth > 0)).length,
                busy: getComputedStyle(document.getElementById('busy')).display}""")
    assert shown == {"query": "none", "broken": 0, "busy": "none"}

    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.emulateNetworkConditions", {
        "offline": False, "latency": 1500, "downloadThroughput": -1, "uploadThroughput": -1})
    try:
        # the loading state is on in the click's own task: before any frame, well within 100 ms
        busy = browser.execute_script(f"""
            const box = document.getElementById('image-id'); box.value = '{a}';
            document.getElementById('go').click();
            return !document.getElementById('busy').hidden
                && document.getElementById('results').getAttribute('aria-busy') === 'true'""")
        assert busy
        # superseded: b's search starts while a's is in flight; only b's answer is shown
        browser.execute_script(f"""
            const box = document.getElementById('image-id'); box.value = '{b}';
            document.getElementById('go').click();""")
        wait.until(lambda d: d.find_element(By.ID, "busy").get_attribute("hidden") is not None)
        assert browser.find_element(By.ID, "query-title").text.startswith(f"image {b}")
        time.sleep(2)  # a's answer, had it not been cancelled, would have landed by now
        assert browser.find_element(By.ID, "query-title").text.startswith(f"image {b}")
        assert f"image_id={b}" in browser.current_url
    finally:
        browser.execute_cdp_cmd("Network.emulateNetworkConditions", {
            "offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})
    assert len(browser.find_elements(By.CSS_SELECTOR, "#grid .card")) == 8
    assert "stale" not in browser.find_element(By.ID, "grid").get_attribute("class")

    # an error clears what was there
    box = browser.find_element(By.ID, "image-id")
    box.clear()
    box.send_keys("987654321\n")
    wait.until(lambda d: d.find_element(By.ID, "error").get_attribute("hidden") is None)
    assert browser.find_elements(By.CSS_SELECTOR, "#grid .card") == []
    assert browser.find_element(By.ID, "query").get_attribute("hidden") is not None

    # a filter that matches nothing: an empty result that says why, no error banner
    browser.get(f"{base}/?image_id={a}&k=4&label=no-such-label")
    wait.until(lambda d: "No neighbours" in d.find_element(By.ID, "summary").text)
    assert "no image on file matches the filter label=no-such-label" in browser.find_element(By.ID, "summary").text
    assert browser.find_element(By.ID, "error").get_attribute("hidden") is not None


AXE = ROOT / ".cache" / "axe" / "node_modules" / "axe-core" / "axe.min.js"


def axe_violations(browser) -> list:
    """axe-core (the npm registry's, fetched by `make test`) run in the page: serious and
    critical violations of WCAG 2 A/AA, as (rule, how many nodes, an example)."""
    if not AXE.exists():
        msg = f"no axe-core at {AXE}: make test fetches it with npm"
        if os.environ.get("MEDSIM_REQUIRE_BROWSER"):
            pytest.fail(msg + " (MEDSIM_REQUIRE_BROWSER is set)")
        pytest.skip(msg)
    browser.execute_script(AXE.read_text())
    result = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        axe.run(document, {runOnly: {type: 'tag', values: ['wcag2a', 'wcag2aa', 'wcag21aa']}})
           .then(r => done(r.violations.filter(v => ['serious', 'critical'].includes(v.impact))
                                    .map(v => [v.id, v.nodes.length, v.nodes[0].html.slice(0, 160)])))
           .catch(e => done([['axe failed', 0, String(e)]]));""")
    return result


def test_neighbour_view_export_browse_and_accessibility(server, browser, tmp_path):
    """The workbench: a neighbour opens beside the query at a readable size with its record;
    zoom moves both images; the view has its own URL; export downloads a CSV whose rows are
    the JSON's neighbours; "More results" extends the list; browse pages through a dataset
    and opens an image; axe-core finds no serious or critical violation on each view."""
    import csv

    from selenium.webdriver.common.by import By

    base, conn, (token, _) = server
    qid = conn.execute("SELECT min(id) FROM medsim.images WHERE split = 'test'").fetchone()[0]
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    browser.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    wait = open_search(browser, f"{base}/?image_id={qid}&k=8", token, 8)
    wait.until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#grid img')].every(i => i.complete && i.naturalWidth > 0)"))
    assert (v := axe_violations(browser)) == [], v

    # the neighbour view: both previews drawn at a readable size, the record, zoom in step
    card = browser.find_elements(By.CSS_SELECTOR, "#grid .card")[2]
    nid = card.get_attribute("data-image-id")
    card.click()
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-viewing") == nid)
    wait.until(lambda d: d.execute_script(
        "return ['view-q', 'view-n'].every(id => { const i = document.getElementById(id); "
        "return i.complete && i.naturalWidth >= 512; })"))
    record = browser.find_element(By.ID, "record").text
    sha = conn.execute("SELECT encode(sha256, 'hex') FROM medsim.images WHERE id = %s", (int(nid),)).fetchone()[0]
    assert sha in record and "patient key" in record and "stored size" in record and "28 × 28" in record
    browser.execute_script("const z = document.getElementById('zoom'); z.value = 3; "
                           "z.dispatchEvent(new Event('input'));")
    transforms = browser.execute_script(
        "return ['view-q', 'view-n'].map(id => document.getElementById(id).style.transform)")
    assert transforms[0] == transforms[1] and "scale(3)" in transforms[0]
    sizes = browser.execute_script(
        "return ['view-q', 'view-n'].map(id => document.getElementById(id).getBoundingClientRect().width)")
    assert min(sizes) > 600  # three times a pane of more than 200 px
    assert (v := axe_violations(browser)) == [], v
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "serve-neighbour-view.png"))
    # the similarity map: both images become overlays (GET /explain), with the key shown
    before = browser.execute_script("return ['view-q', 'view-n'].map(id => document.getElementById(id).src)")
    browser.find_element(By.ID, "explain").click()
    wait.until(lambda d: all(a != b for a, b in zip(d.execute_script(
        "return ['view-q', 'view-n'].map(id => document.getElementById(id).src)"), before, strict=True)))
    wait.until(lambda d: d.execute_script(
        "return ['view-q', 'view-n'].every(id => { const i = document.getElementById(id); "
        "return i.complete && i.naturalWidth >= 512; })"))
    assert browser.find_element(By.ID, "explain-key").is_displayed()
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-faith-checked") in ("passed", "failed"))
    warned = browser.find_element(By.ID, "explain-warn").is_displayed()
    assert warned == (browser.find_element(By.TAG_NAME, "body").get_attribute("data-faith-checked") == "failed")
    red = browser.execute_script("""
        const i = document.getElementById('view-n'), c = document.createElement('canvas');
        c.width = i.naturalWidth; c.height = i.naturalHeight;
        const g = c.getContext('2d'); g.drawImage(i, 0, 0);
        const d = g.getImageData(0, 0, c.width, c.height).data; let n = 0;
        for (let k = 0; k < d.length; k += 4) if (d[k] > d[k + 1] + 40) n++;
        return n / (c.width * c.height);""")
    assert red > 0.01  # the overlay is there: some of the neighbour is marked
    browser.save_screenshot(str(ARTIFACTS / "serve-explain.png"))
    browser.find_element(By.ID, "explain").click()
    # its URL opens it again in a fresh page
    url = browser.current_url
    assert f"view={nid}" in url
    browser.get(url)
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-viewing") == nid)
    browser.find_element(By.ID, "viewer-close").click()
    assert "view=" not in browser.current_url

    # export: the CSV's rows are the search's neighbours
    answer = [n for n in browser.execute_script("return state.last.neighbours")]
    browser.find_element(By.CSS_SELECTOR, "#export [data-format=csv]").click()
    wait.until(lambda d: list(downloads.glob("*.csv")) and not list(downloads.glob("*.crdownload")))
    rows = list(csv.DictReader(io.StringIO(next(downloads.glob("*.csv")).read_text())))
    assert [int(r["image_id"]) for r in rows] == [n["image_id"] for n in answer]
    assert [r["label_name"] for r in rows] == [n["label_name"] for n in answer]

    # more results: 8 -> 16, the first 8 unchanged
    browser.find_element(By.ID, "more").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#grid .card")) == 16)
    ids16 = [int(c.get_attribute("data-image-id")) for c in browser.find_elements(By.CSS_SELECTOR, "#grid .card")]
    assert ids16[:8] == [n["image_id"] for n in answer] and "k=16" in browser.current_url

    # browse: retinamnist's test split, page 2, then open an image and search from it
    n_test = conn.execute("SELECT count(*) FROM medsim.images i JOIN medsim.datasets d ON d.id = i.dataset_id "
                          "WHERE d.flag = 'retinamnist' AND i.split = 'test'").fetchone()[0]
    browser.get(f"{base}/?browse=1&dataset=retinamnist&split=test")
    wait.until(lambda d: (d.find_element(By.TAG_NAME, "body").get_attribute("data-browsed") or "").startswith("0:"))
    assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-browsed") == f"0:48:{n_test}"
    browser.find_element(By.ID, "b-next").click()
    wait.until(lambda d: (d.find_element(By.TAG_NAME, "body").get_attribute("data-browsed") or "").startswith("48:"))
    ids = [int(c.get_attribute("data-image-id")) for c in browser.find_elements(By.CSS_SELECTOR, "#b-grid .card")]
    want = [r[0] for r in conn.execute(
        "SELECT i.id FROM medsim.images i JOIN medsim.datasets d ON d.id = i.dataset_id "
        "WHERE d.flag = 'retinamnist' AND i.split = 'test' ORDER BY i.id OFFSET 48 LIMIT 48")]
    assert ids == want and "offset=48" in browser.current_url
    wait.until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#b-grid img')].every(i => i.complete && i.naturalWidth > 0)"))
    assert (v := axe_violations(browser)) == [], v
    browser.save_screenshot(str(ARTIFACTS / "serve-browse.png"))
    browser.find_elements(By.CSS_SELECTOR, "#b-grid .card")[0].click()
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-viewing") == str(want[0]))
    assert browser.find_element(By.ID, "pane-q").get_attribute("hidden") is not None  # no query in browse
    browser.find_element(By.ID, "search-from").click()
    wait.until(lambda d: d.find_element(By.ID, "query-title").text.startswith(f"image {want[0]}"))
    assert browser.find_element(By.ID, "browse").get_attribute("hidden") is not None


def test_an_upload_search_has_a_url_that_reproduces_it(server, browser):
    """A DICOM upload (which the browser cannot draw) gets the server's preview as its query
    image and a URL with the service's handle; that URL, opened in a fresh session (no
    token, no page state), shows the same neighbours."""
    import pydicom
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    base, conn, (token, _) = server
    ct = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"
    browser.get(base + "/?k=8")
    wait = WebDriverWait(browser, 30)
    sign_in(browser, wait, token)
    browser.find_element(By.ID, "file").send_keys(str(ct))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#grid .card")) == 8)
    wait.until(lambda d: "upload=" in d.current_url)
    wait.until(lambda d: d.execute_script(
        "const i = document.getElementById('query-img'); return i.complete && i.naturalWidth > 0"))
    ids = [c.get_attribute("data-image-id") for c in browser.find_elements(By.CSS_SELECTOR, "#grid .card")]
    url = browser.current_url
    browser.execute_script("sessionStorage.clear()")
    browser.get("about:blank")
    browser.get(url)
    sign_in(browser, wait, token)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#grid .card")) == 8)
    assert [c.get_attribute("data-image-id") for c in browser.find_elements(By.CSS_SELECTOR, "#grid .card")] == ids
    assert browser.find_element(By.ID, "query-title").text.startswith("a kept upload")
    wait.until(lambda d: d.execute_script(
        "const i = document.getElementById('query-img'); return i.complete && i.naturalWidth > 0"))


def test_search_by_a_region_dragged_on_the_query(server, browser):
    """Drag a box over the query image's top-left corner: the search runs with that region
    (its pixels in the URL and the title), the neighbours change, and "Whole image"
    restores the first answer."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    base, conn, (token, _) = server
    qid = conn.execute("SELECT min(id) FROM medsim.images i WHERE split = 'test' AND dataset_id = "
                       "(SELECT id FROM medsim.datasets WHERE flag = 'retinamnist')").fetchone()[0]
    wait = open_search(browser, f"{base}/?image_id={qid}&k=8", token, 8)
    first = [c.get_attribute("data-image-id") for c in browser.find_elements(By.CSS_SELECTOR, "#grid .card")]
    searches = browser.find_element(By.TAG_NAME, "body").get_attribute("data-searches")
    browser.find_element(By.ID, "region-btn").click()
    img = browser.find_element(By.ID, "query-img")
    w = img.size["width"]
    ActionChains(browser).move_to_element_with_offset(img, -w // 2 + 2, -w // 2 + 2).click_and_hold() \
        .move_by_offset(w // 2, w // 2).release().perform()
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-searches") != searches)
    assert "box=0%2C0%2C" in browser.current_url or "box=0,0," in browser.current_url
    assert "region [0, 0, 1" in browser.find_element(By.ID, "query-title").text
    after = [c.get_attribute("data-image-id") for c in browser.find_elements(By.CSS_SELECTOR, "#grid .card")]
    assert after != first
    assert browser.find_element(By.ID, "region").is_displayed()
    browser.find_element(By.ID, "region-clear").click()
    wait.until(lambda d: "region" not in d.find_element(By.ID, "query-title").text)
    assert [c.get_attribute("data-image-id") for c in browser.find_elements(By.CSS_SELECTOR, "#grid .card")] == first


def test_results_from_a_pacs_open_its_viewer(server, browser, tmp_path, monkeypatch):
    """A study synced from a real Orthanc: its images' cards and the neighbour view's record
    carry a link to the study in Orthanc's own explorer, which answers."""
    from selenium.webdriver.common.by import By

    from medsim.sources import pacs
    from tests import orthanc
    from tests.helpers import embed_all
    from tests.test_pacs import add_study

    if orthanc.binary() is None or orthanc.dicomweb_plugin() is None:
        if os.environ.get("MEDSIM_REQUIRE_ORTHANC"):
            pytest.fail("no Orthanc (MEDSIM_REQUIRE_ORTHANC is set)")
        pytest.skip("Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)")
    base, conn, (token, _) = server
    monkeypatch.setenv("MEDSIM_PATIENT_KEY", "a test key that is long enough")
    monkeypatch.setenv("MEDSIM_PACS_USER", orthanc.USER)
    monkeypatch.setenv("MEDSIM_PACS_PASSWORD", orthanc.PASSWORD)
    o = orthanc.Orthanc(tmp_path / "orthanc").start()
    try:
        for p in range(3):
            add_study(o, f"W{p}", 6, "benign" if p % 2 else "malignant", seed=40 + p)
        pacs.sync(conn, o.url, "ward", label_tag="StudyDescription", workers=1)
        embed_all(conn.info.dsn)
        query = conn.execute("SELECT i.id FROM medsim.images i JOIN medsim.datasets d ON d.id = i.dataset_id "
                             "WHERE d.flag = 'ward' ORDER BY i.id LIMIT 1").fetchone()[0]
        wait = open_search(browser, f"{base}/?image_id={query}&k=4&dataset=ward", token, 4)
        links = [a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, "#grid .card a.pacs")]
        assert len(links) == 4 and all(h.startswith(f"{o.root}/app/explorer.html#study?uuid=") for h in links)
        assert all(o.http.get(h, timeout=10).status_code == 200 for h in links)
        browser.find_element(By.CSS_SELECTOR, "#grid .card .cardlink").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#record a.pacs"))
        assert browser.find_element(By.CSS_SELECTOR, "#record a.pacs").get_attribute("href") == links[0]
        assert axe_violations(browser) == []
        # the gallery's splits from the URL: train and val only, the query still not its own neighbour
        browser.get(f"{base}/?image_id={query}&k=4&dataset=ward&splits=train,val")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#grid .card")) == 4)
        assert browser.find_element(By.ID, "splits").get_attribute("value") == "train,val"
        assert "nearest from the train and val images" in browser.find_element(By.ID, "summary").text
        ids = [int(c.get_attribute("data-image-id")) for c in browser.find_elements(By.CSS_SELECTOR, "#grid .card")]
        assert query not in ids
    finally:
        o.stop()


def test_the_page_fits_a_phone(server, browser):
    """At a phone's width (390 CSS px) nothing scrolls sideways: the search with its
    results, the neighbour view, and browse. (Was checked by hand only.)"""
    from selenium.webdriver.common.by import By

    base, conn, (token, _) = server
    browser.set_window_size(390, 844)
    qid = conn.execute("SELECT min(id) FROM medsim.images WHERE split = 'test'").fetchone()[0]
    wait = open_search(browser, f"{base}/?image_id={qid}&k=8", token, 8)
    overflow = "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
    assert browser.execute_script("return window.innerWidth") <= 400
    assert browser.execute_script(overflow) <= 0
    card = browser.find_elements(By.CSS_SELECTOR, "#grid .card")[0]
    nid = card.get_attribute("data-image-id")
    card.find_element(By.CSS_SELECTOR, ".cardlink").click()
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-viewing") == nid)
    assert browser.execute_script(overflow) <= 0
    browser.get(f"{base}/?browse=1&dataset=retinamnist")
    wait.until(lambda d: (d.find_element(By.TAG_NAME, "body").get_attribute("data-browsed") or "").startswith("0:"))
    assert browser.find_elements(By.CSS_SELECTOR, "#b-grid .card")
    assert browser.execute_script(overflow) <= 0
    # the measure can fail: one element wider than the phone makes the page scroll sideways
    browser.execute_script("const d = document.createElement('div'); d.style.width = '900px'; "
                           "d.style.height = '1px'; document.body.append(d);")
    assert browser.execute_script(overflow) > 0


# ---------------------------------------------------------------- issue 34 (4, 5): honest states on the page
def ingest_unembedded(conn, root: Path, flag: str = "cxr", n: int = 6) -> None:
    """A folder archive ingested after the worker ran: on file, embedded for no model."""
    from medsim.sources import archive
    from medsim.sources.folder import FolderSource

    (root / flag / "normal").mkdir(parents=True)
    rng = np.random.default_rng(3)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (30, 30), dtype=np.uint8)).save(root / flag / "normal" / f"{i}.png")
    assert archive.ingest_archive(conn, FolderSource(root / flag), flag, progress=False).added == n


def test_status_and_health_open_on_the_page_signed_in(server, browser, tmp_path):
    """The footer's "embedding status" and "health" work for a signed-in user (they were
    plain links: a raw 401): a panel shows the status with its sentence for what is not
    embedded yet, and a search filtered to that dataset says so instead of "no image
    matches"; a user granted one dataset hears of no other."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    base, conn, (token, retina_only) = server
    ingest_unembedded(conn, tmp_path)
    mid = conn.execute("SELECT id FROM medsim.models WHERE is_current").fetchone()[0]
    said = f"6 of 6 images of cxr are not embedded yet for model {mid} (run `medsim worker`)"
    qid = conn.execute("SELECT min(id) FROM medsim.images WHERE split = 'test'").fetchone()[0]
    browser.get(f"{base}/?image_id={qid}&k=4&dataset=cxr")
    wait = WebDriverWait(browser, 30)
    sign_in(browser, wait, token)
    wait.until(lambda d: "No neighbours" in d.find_element(By.ID, "summary").text)
    assert browser.find_element(By.ID, "summary").text == f"No neighbours: {said}"

    browser.find_element(By.ID, "status-btn").click()
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-panel") == "status")
    panel = browser.find_element(By.ID, "status-panel")
    assert panel.is_displayed()
    datasets = {r.find_elements(By.TAG_NAME, "td")[1].text for r in panel.find_elements(By.CSS_SELECTOR, "tr")[1:]}
    assert datasets == {"breastmnist", "retinamnist", "cxr"}
    assert [li.text for li in panel.find_elements(By.CSS_SELECTOR, "#status-notes li")] == [said]
    assert (v := axe_violations(browser)) == [], v
    browser.find_element(By.ID, "health-btn").click()
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-panel") == "health")
    assert "reachable" in panel.text and "401" not in panel.text
    browser.find_element(By.ID, "status-close").click()
    assert not panel.is_displayed()

    browser.find_element(By.ID, "logout").click()
    sign_in(browser, wait, retina_only)
    browser.find_element(By.ID, "status-btn").click()
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-panel") == "status")
    assert "retinamnist" in panel.text and "cxr" not in panel.text and "breastmnist" not in panel.text


def test_a_user_granted_nothing_is_told_at_sign_in(server, browser):
    """A user with no grant signs in to one sentence naming `medsim grant`, not to "no test
    image" and empty results without a word of why; a granted user sees no such notice."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from medsim import access

    base, conn, (token, _) = server
    access.add_user(conn, "newcomer")
    bare = access.create_token(conn, "newcomer")[0]
    browser.get(base + "/")
    wait = WebDriverWait(browser, 30)
    sign_in(browser, wait, bare)
    wait.until(lambda d: d.find_element(By.ID, "notice").is_displayed())
    said = "user newcomer sees no dataset yet: an administrator runs `medsim grant newcomer DATASET`"
    assert browser.find_element(By.ID, "notice").text == said
    assert (v := axe_violations(browser)) == [], v
    browser.find_element(By.ID, "random").click()
    wait.until(lambda d: d.find_element(By.ID, "error").is_displayed())
    assert "medsim grant newcomer DATASET" in browser.find_element(By.ID, "error").text

    browser.find_element(By.ID, "logout").click()
    assert not browser.find_element(By.ID, "notice").is_displayed()
    sign_in(browser, wait, token)
    assert not browser.find_element(By.ID, "notice").is_displayed()


def test_card_text_is_wrapped_never_cut(server, browser):
    """A card's dataset, split and id are shown whole (wrapped where they must be): an
    ellipsis cut browse's "retinamnist · train · image 123" to "retinamnist · train · im…"."""
    from selenium.webdriver.common.by import By

    base, conn, (token, _) = server
    cut = """return [...document.querySelectorAll(arguments[0])].filter(e => e.scrollWidth > e.clientWidth + 1)
                 .map(e => e.textContent)"""
    qid = conn.execute("SELECT min(id) FROM medsim.images WHERE split = 'test'").fetchone()[0]
    wait = open_search(browser, f"{base}/?image_id={qid}&k=8", token, 8)
    assert browser.execute_script(cut, "#grid .card .body > *") == []
    browser.get(f"{base}/?browse=1&dataset=retinamnist")
    wait.until(lambda d: (d.find_element(By.TAG_NAME, "body").get_attribute("data-browsed") or "").startswith("0:"))
    cards = browser.find_elements(By.CSS_SELECTOR, "#b-grid .card")
    assert cards and all(c.find_element(By.CSS_SELECTOR, ".where").text.endswith(
        f"image {c.get_attribute('data-image-id')}") for c in cards)
    assert browser.execute_script(cut, "#b-grid .card .body > *") == []
