"""Issue 21: who may see which images. Users, tokens and per-dataset grants, enforced by
PostgreSQL row-level security for the HTTP service, the FAISS path and a SQL login alike;
an access log that nobody can rewrite.

The authorization matrix: principals x endpoints x engines x images from three archives
(A, B, C, each with labels and a name found nowhere else). No response may carry an id,
a name, a label, a count, a thumbnail or a vote of an archive the principal is not granted.
"""

from __future__ import annotations

import datetime as dt
import io
import itertools
import json
import re
from pathlib import Path

import numpy as np
import psycopg
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from medsim import access, audit, db
from medsim.errors import BadArgument, NotFound
from medsim.search import faiss_index
from medsim.service.app import create_app
from medsim.service.state import ServeConfig
from medsim.sources import archive
from medsim.sources.folder import FolderSource
from tests.conftest import create_database, url_for
from tests.helpers import embed_all, register_model

ARCHIVES = {"A": "alphaarchive", "B": "bravoarchive", "C": "charliearchive"}
LABELS = {k: (f"{k.lower()}label_x", f"{k.lower()}label_y") for k in ARCHIVES}
ENGINES = ("pgvector", "exact", "faiss")
_n = itertools.count()


def write_archive(root, key: str, n: int, seed: int, shared: np.ndarray) -> None:
    rng = np.random.default_rng(seed)
    lines = ["path,label,patient_id"]
    for i in range(n):
        label = LABELS[key][i % 2]
        (root / label).mkdir(parents=True, exist_ok=True)
        px = shared if i == 0 else rng.integers(0, 256, (16, 16), dtype=np.uint8)  # one image in A and B alike
        Image.fromarray(px).save(root / label / f"{i}.png")
        lines.append(f"{label}/{i}.png,{label},{key}-patient-{i // 3}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def world(admin_url, template_db, tmp_path_factory):
    """Three archives, an untrained current model, every image embedded, a FAISS build, a
    calibration per archive, an audit; users and tokens for each principal of the matrix."""
    url = create_database(admin_url, f"t_access_{next(_n)}", template=template_db)
    shared = np.random.default_rng(99).integers(0, 256, (16, 16), dtype=np.uint8)
    with db.connect(url, autocommit=True) as conn:
        for i, (key, name) in enumerate(ARCHIVES.items()):
            root = tmp_path_factory.mktemp(name)
            write_archive(root, key, 36, seed=i, shared=shared if key in "AB" else np.zeros((16, 16), np.uint8) + 7)
            archive.ingest_archive(conn, FolderSource(root, manifest=root / "labels.csv"), name, progress=False)
        mid = register_model(conn)
        embed_all(url)
        faiss_index.build(conn, mid, "flat", out_dir=tmp_path_factory.mktemp("idx"))
        for name in ARCHIVES.values():
            conn.execute("INSERT INTO medsim.calibrations (model_id, dataset, a, b, vote_a, vote_b, report) "
                         "VALUES (%s, %s, 2, -3, 1, 1, '{}')", (mid, name))
        audit.run(conn, "current")
        ids = {k: [r[0] for r in conn.execute(
            "SELECT i.id FROM medsim.images i JOIN medsim.datasets d ON d.id = i.dataset_id "
            "WHERE d.flag = %s ORDER BY i.id", (name,))] for k, name in ARCHIVES.items()}
        tests = {k: conn.execute("SELECT i.id FROM medsim.images i JOIN medsim.datasets d ON d.id = i.dataset_id "
                                 "WHERE d.flag = %s AND i.split = 'test' ORDER BY i.id LIMIT 1", (name,)).fetchone()[0]
                 for k, name in ARCHIVES.items()}
        tokens = {}
        for user, grants, scope in (("ua", "A", "images"), ("uab", "AB", "images"), ("root", "*", "admin"),
                                    ("usearch", "ABC", "search"), ("gone", "ABC", "images"),
                                    ("late", "ABC", "images"), ("nogrant", "", "images")):
            access.add_user(conn, user, sql_login=True)
            if grants == "*":
                access.grant(conn, user, [], every=True)
            elif grants:
                access.grant(conn, user, [ARCHIVES[g] for g in grants])
            tokens[user] = access.create_token(conn, user, scope)[0]
        access.revoke_tokens(conn, name="gone")
        conn.execute("UPDATE medsim.tokens t SET expires_at = now() - interval '1 minute' FROM medsim.users u "
                     "WHERE u.id = t.user_id AND u.name = 'late'")
        vectors = {k: conn.execute("SELECT embedding::text FROM medsim.embeddings WHERE image_id = %s",
                                   (tests[k],)).fetchone()[0] for k in ARCHIVES}
        pngs = {}
        for k in ARCHIVES:
            h, w, raw = conn.execute("SELECT height, width, pixels FROM medsim.images WHERE id = %s",
                                     (tests[k],)).fetchone()
            buf = io.BytesIO()
            Image.fromarray(np.frombuffer(raw, np.uint8).reshape(h, w)).save(buf, format="PNG")
            pngs[k] = buf.getvalue()
    return {"url": url, "ids": ids, "tests": tests, "tokens": tokens, "mid": mid,
            "vectors": {k: json.loads(v) for k, v in vectors.items()}, "pngs": pngs}


PRINCIPALS = {  # name -> (token user or a literal header, archives it may see, expected status for data)
    "no token": (None, "", 401), "garbage": ("Bearer nonsense", "", 401), "wrong secret": ("wrong", "", 401),
    "revoked": ("gone", "", 401), "expired": ("late", "", 401), "search scope": ("usearch", "ABC", None),
    "granted nothing": ("nogrant", "", None), "A only": ("ua", "A", None), "A and B": ("uab", "AB", None),
    "admin": ("root", "ABC", None),
}


def header(world, who: str) -> dict:
    ref = PRINCIPALS[who][0]
    if ref is None:
        return {}
    if ref.startswith("Bearer"):
        return {"Authorization": ref}
    if ref == "wrong":
        t = world["tokens"]["ua"]
        return {"Authorization": "Bearer " + t[:-4] + ("aaaa" if not t.endswith("aaaa") else "bbbb")}
    return {"Authorization": "Bearer " + world["tokens"][ref]}


def forbidden(world, allowed: str) -> tuple[set, list]:
    """Ids and words that must never reach a principal allowed these archives."""
    ids = {i for k in ARCHIVES if k not in allowed for i in world["ids"][k]}
    words = [w for k in ARCHIVES if k not in allowed for w in (ARCHIVES[k], *LABELS[k])]
    return ids, words


def ids_in(body) -> set:
    """Every image id a response names, wherever it is."""
    found = set()
    if isinstance(body, dict):
        for key, v in body.items():
            if (key == "image_id" or key == "id" and "split" in body) and isinstance(v, int):  # not a model's id
                found.add(v)
            elif key in ("in_gallery", "image_ids") and isinstance(v, list):
                found |= set(v)
            else:
                found |= ids_in(v)
    elif isinstance(body, list):
        for v in body:
            found |= ids_in(v)
    return found


def requests_for(world):
    """(name, method, path, kwargs, needs) for every endpoint, engine and archive."""
    out = []
    for k, eng in itertools.product(ARCHIVES, ENGINES):
        out.append((f"search id {k} {eng}", "post", "/search",
                    {"json": {"image_id": world["tests"][k], "k": 5, "engine": eng}}, "search"))
        out.append((f"search vector {k} {eng}", "post", "/search",
                    {"json": {"vector": world["vectors"][k], "k": 5, "engine": eng}}, "search"))
        out.append((f"upload {k} {eng}", "post", "/search/upload",
                    {"files": {"image": ("q.png", world["pngs"][k], "image/png")},
                     "data": {"k": "5", "engine": eng}}, "search"))
    for k in ARCHIVES:
        for i in (world["tests"][k], world["ids"][k][0]):
            out.append((f"image {k} {i}", "get", f"/images/{i}", {}, "images"))
            out.append((f"thumbnail {k} {i}", "get", f"/images/{i}/thumbnail.png", {}, "images"))
            out.append((f"preview {k} {i}", "get", f"/images/{i}/preview.png", {}, "images"))
            out.append((f"embedding {k} {i}", "get", f"/images/{i}/embedding", {}, "images"))
            out.append((f"original {k} {i}", "get", f"/images/{i}/original", {}, "admin"))
        out.append((f"browse {k}", "get", f"/images?limit=200&dataset={ARCHIVES[k]}", {}, "images"))
        out.append((f"explain {k}", "get", f"/explain?query={world['ids'][k][0]}&neighbour={world['ids'][k][1]}",
                    {}, "images"))
        out.append((f"search filtered to {k}", "post", "/search",
                    {"json": {"image_id": world["tests"]["A"], "k": 5, "filters": {"dataset": ARCHIVES[k]}}},
                    "search"))
    for path in ("/datasets", "/status", "/models", "/images/random?split=test", "/images/random?split=train"):
        out.append((path, "get", path, {}, "search"))
    out.append(("browse all", "get", "/images?limit=200", {}, "images"))
    out.append(("export", "post", "/search/export?format=json",
                {"json": {"image_id": world["tests"]["A"], "k": 5}}, "search"))
    out += [("/metrics", "get", "/metrics", {}, "local"), ("/healthz", "get", "/healthz", {}, "local")]
    return out


def expected(who: str, need: str, name: str) -> set:
    ref, allowed, status = PRINCIPALS[who]
    if need == "local":
        return {200}  # from loopback, without a token; from elsewhere: test_metrics_and_health_from_elsewhere
    if status is not None:
        return {status}
    if need == "images" and who == "search scope":
        return {403}
    if need == "admin":  # the PACS's original: admins only; these archives are folders, so 404 even then
        return {404} if who == "admin" else {403}
    if name.startswith("browse"):  # a page of what the user may see: never an error, maybe empty
        return {200}
    if name == "export":
        return {403} if who == "granted nothing" else {200} if "A" in allowed else {404}
    if who == "granted nothing":
        return {403} if name.startswith(("search", "upload")) else {404} if "random" in name or need == "images" \
            else {200}
    if name.startswith("search filtered to"):
        return {200} if name[-1] in allowed else {403}
    if name.startswith(("search id", "image", "thumbnail", "preview", "embedding", "explain")):
        archive_key = name.split()[2 if name.startswith("search") else 1]
        return {200} if archive_key in allowed else {404}
    if name.startswith("search vector") and "faiss" not in name:
        return {200}
    return {200, 404}  # FAISS by vector; uploads; random ids


def test_the_authorization_matrix_over_http(world):
    """Every principal x every endpoint x every engine x every archive; then the log."""
    url = world["url"]
    with db.connect(url, autocommit=True) as conn:
        log_before = conn.execute("SELECT count(*) FROM medsim.access_log").fetchone()[0]
    served, cases = [], 0
    with TestClient(create_app(ServeConfig(database_url=url, auth=True))) as client:
        client.app.state.service.guard.limits = {"address": 10**6, "pair": 10**6}  # the matrix fails on purpose
        for who in PRINCIPALS:
            ids, words = forbidden(world, PRINCIPALS[who][1])
            for name, method, path, kw, need in requests_for(world):
                cases += 1
                r = getattr(client, method)(path, headers=header(world, who), **kw)
                assert r.status_code in expected(who, need, name), (who, name, r.status_code, r.text[:300])
                if r.headers["content-type"].startswith("application/json"):
                    body = r.json()
                    leaked = ids_in(body) & ids
                    assert not leaked, (who, name, sorted(leaked)[:5])
                    text = r.text
                elif r.headers["content-type"].startswith("image/png"):
                    text = ""
                    assert int(path.split("/")[2]) not in ids, (who, name)
                else:
                    text = r.text
                for w in words:
                    assert w not in text, (who, name, w, text[:300])
                if r.status_code == 200 and need != "local":
                    if name.startswith(("search", "upload")) and path.startswith("/search"):
                        served.append((who, "search", {n["image_id"] for n in r.json()["neighbours"]}))
                        if PRINCIPALS[who][1] and "filtered" not in name:
                            assert len(r.json()["neighbours"]) == 5, (who, name)  # k, however few they may see
                    elif name == "export":  # one row: the export, with what it held
                        served.append((who, "export", {n["image_id"] for n in r.json()["neighbours"]}))
                    elif name.startswith("browse"):
                        served.append((who, "browse", {d["id"] for d in r.json()["images"]}))
                    elif name.startswith("explain"):
                        q, n = (int(v.split("=")[1]) for v in path.split("?")[1].split("&"))
                        served.append((who, "explain", {n, q}))
                    elif name.startswith(("image ", "thumbnail", "preview", "embedding")):
                        served.append((who, name.split()[0], {int(path.split("/")[2])}))
    assert cases == len(PRINCIPALS) * len(requests_for(world)) == 750
    with db.connect(url, autocommit=True) as conn:
        logged = conn.execute("SELECT user_name, action, image_ids FROM medsim.access_log WHERE id > "
                              "(SELECT coalesce(max(id), 0) FROM medsim.access_log) - %s ORDER BY id",
                              (len(served),)).fetchall()
        assert conn.execute("SELECT count(*) FROM medsim.access_log").fetchone()[0] - log_before == len(served)
    users = {who: PRINCIPALS[who][0] for who in PRINCIPALS}
    assert [(r[0], r[1], set(r[2])) for r in logged] == [(users[w], a, s) for w, a, s in served]


SQL_SURFACES = [
    "SELECT id, flag FROM medsim.datasets", "SELECT id FROM medsim.images", "SELECT image_id FROM medsim.embeddings",
    "SELECT image_id FROM medsim.embedding_queue", "SELECT image_id, dataset, label_name FROM medsim.gallery",
    "SELECT image_id, dataset FROM medsim.embedded_images", "SELECT image_id, dataset FROM medsim.query_images",
    "SELECT image_id, dataset FROM medsim.current_embeddings", "SELECT dataset, total FROM medsim.embedding_status",
    "SELECT image_ids, datasets FROM medsim.exact_duplicates", "SELECT * FROM medsim.patients_in_two_splits",
    "SELECT image_a, image_b FROM medsim.leakage", "SELECT image_a, image_b FROM medsim.audit_findings",
    "SELECT summary FROM medsim.audits", "SELECT dataset FROM medsim.calibrations",
    "SELECT id, dataset_id, added FROM medsim.ingest_reports", "SELECT report_id, reason FROM medsim.ingest_problems",
    "SELECT n_rows FROM medsim.index_builds", "SELECT results FROM medsim.evaluations",
    "SELECT role_name, dataset_id FROM medsim.dataset_grants",
]


@pytest.mark.parametrize("user,allowed", [("ua", "A"), ("uab", "AB"), ("root", "ABC"), ("nogrant", "")])
def test_the_same_matrix_through_a_sql_login(world, user, allowed):
    """The person logs in to PostgreSQL as their own role: the same rule, nothing to set."""
    ids, words = forbidden(world, allowed)
    url = world["url"].replace("postgresql://postgres", f"postgresql://medsim_user_{user}", 1)
    with db.connect(url, autocommit=True) as c:
        assert c.execute("SELECT current_user").fetchone()[0] == f"medsim_user_{user}"
        for q in SQL_SURFACES:
            cur = c.execute(q)
            got = cur.fetchall()
            text = json.dumps(got, default=str)
            for w in words:
                assert w not in text, (user, q, w)
            image_columns = [i for i, d in enumerate(cur.description)
                             if d.name in ("image_id", "image_ids", "image_a", "image_b")
                             or d.name == "id" and "medsim.images" in q]
            named = {v for r in got for i in image_columns for v in (r[i] if isinstance(r[i], list) else [r[i]])}
            assert not named & ids, (user, q, sorted(named & ids)[:5])
        for k, i in world["tests"].items():
            for q in ("SELECT image_id, dataset, label_name FROM medsim.similar_images(%s, 5)",
                      "SELECT s.image_id, medsim.p_same_label(NULL, s.dataset, s.distance) "
                      "FROM medsim.similar_images(%s, 5) s"):
                if k in allowed:
                    got = c.execute(q, (i,)).fetchall()
                    assert len(got) == 5 and not {r[0] for r in got} & ids, (user, k, got)
                else:
                    with pytest.raises(psycopg.errors.RaiseException, match="no embedding"):
                        c.execute(q, (i,))
            got = c.execute("SELECT image_id FROM medsim.search_by_vector(%s::vector, 5)",
                            (str(world["vectors"][k]),)).fetchall()
            assert not {r[0] for r in got} & ids and len(got) == (5 if allowed else 0)
        # what a session can set does not widen it
        other = "medsim_user_ua" if user == "root" else "medsim_user_root"
        for attempt in ("SET ROLE medsim_reader", f"SET ROLE {other}", "SET ROLE medsim_nobody",
                        "SELECT set_config('role', 'medsim_reader', false)",
                        "INSERT INTO medsim.dataset_grants (role_name) VALUES (current_user)",
                        "UPDATE medsim.dataset_grants SET role_name = current_user",
                        "SELECT * FROM medsim.tokens", "SELECT * FROM medsim.users", "SELECT * FROM medsim.access_log",
                        "UPDATE medsim.images SET split = 'train'"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute(attempt)
        assert c.execute("SELECT count(*) FROM medsim.images").fetchone()[0] == sum(
            len(world["ids"][k]) for k in allowed)


def test_the_access_log_is_append_only_even_for_the_service_login(world):
    url = world["url"]
    with TestClient(create_app(ServeConfig(database_url=url))) as client:
        r = client.post("/search", json={"image_id": world["tests"]["A"], "k": 3},
                        headers={"Authorization": "Bearer " + world["tokens"]["ua"]})
        assert r.status_code == 200
    with db.connect(url, autocommit=True) as conn:  # the login the service uses (the owner)
        n = conn.execute("SELECT count(*) FROM medsim.access_log").fetchone()[0]
        assert n >= 1
        for change in ("UPDATE medsim.access_log SET user_name = 'someone else'", "DELETE FROM medsim.access_log",
                       "TRUNCATE medsim.access_log"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
                conn.execute(change)
        assert conn.execute("SELECT count(*) FROM medsim.access_log").fetchone()[0] == n
        conn.execute("SET ROLE medsim_reader")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("INSERT INTO medsim.access_log (user_name, action, image_ids) VALUES ('x', 'search', '{}')")


def test_revoking_a_token_or_a_grant_works_at_once_in_a_running_service(world, admin_url):
    url = world["url"]
    with db.connect(url, autocommit=True) as conn:
        token, tid = access.create_token(conn, "uab", "images")
        body = {"image_id": world["tests"]["B"], "k": 3}
        with TestClient(create_app(ServeConfig(database_url=url))) as client:
            h = {"Authorization": f"Bearer {token}"}
            assert client.post("/search", json=body, headers=h).status_code == 200
            access.revoke(conn, "uab", [ARCHIVES["B"]])
            r = client.post("/search", json=body, headers=h)
            assert r.status_code == 404 and "no image with id" in r.json()["detail"]
            access.grant(conn, "uab", [ARCHIVES["B"]])
            assert client.post("/search", json=body, headers=h).status_code == 200
            assert access.revoke_tokens(conn, tid) == [tid]
            r = client.post("/search", json=body, headers=h)
            assert r.status_code == 401 and r.json()["detail"] == f"token {tid} was revoked"
            assert r.headers["www-authenticate"] == "Bearer"


def test_metrics_and_health_from_elsewhere_need_a_token(world):
    app = create_app(ServeConfig(database_url=world["url"]))
    with TestClient(app, client=("192.0.2.7", 1000)) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/healthz").status_code == 401
        user = {"Authorization": "Bearer " + world["tokens"]["ua"]}
        assert client.get("/metrics", headers=user).status_code == 403
        assert client.get("/healthz", headers=user).status_code == 200
        assert client.get("/metrics", headers={"Authorization": "Bearer " + world["tokens"]["root"]}).status_code == 200
    with TestClient(app, client=("127.0.0.1", 1000)) as local:
        assert local.get("/metrics").status_code == 200


def test_security_headers_and_an_offline_api_page(world):
    with TestClient(create_app(ServeConfig(database_url=world["url"]))) as client:
        for path in ("/", "/static/app.js", "/docs", "/datasets", "/openapi.json"):
            r = client.get(path)
            csp = r.headers["content-security-policy"]
            assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
            assert r.headers["x-content-type-options"] == "nosniff"
        docs = client.get("/docs").text
        assert "http" not in docs and "<script>" not in docs  # no CDN, no inline script
        for src in ("/static/swagger/swagger-ui-bundle.js", "/static/swagger/swagger-ui.css", "/static/docs.js"):
            assert src in docs and client.get(src).status_code == 200
        page = client.get("/").text
        assert "<script>" not in page and "style=" not in page
        schema = client.get("/openapi.json").json()
        assert "HTTPBearer" in schema["components"]["securitySchemes"]


def test_the_commands_refuse_bad_input_in_one_sentence(world):
    with db.connect(world["url"], autocommit=True) as conn:
        for bad in ("Alice", "1abc", "a" * 41, "robert'); drop table x;--", ""):
            with pytest.raises(BadArgument, match="a user name is"):
                access.add_user(conn, bad)
        with pytest.raises(BadArgument, match="exists already"):
            access.add_user(conn, "ua")
        with pytest.raises(NotFound, match="no user named 'nobody'"):
            access.create_token(conn, "nobody")
        with pytest.raises(NotFound, match="no dataset named 'nosuch'"):
            access.grant(conn, "ua", ["nosuch"])
        with pytest.raises(BadArgument, match="scope must be one of"):
            access.create_token(conn, "ua", "everything")
        for text in ("0d", "30", "1y", "-5d", "999999d"):
            with pytest.raises(BadArgument, match="--expires takes"):
                access.parse_expiry(text)
        assert access.parse_expiry("30d") == dt.timedelta(days=30) and access.parse_expiry("never") is None
        assert conn.execute("SELECT count(*) FROM medsim.dataset_grants WHERE role_name = 'medsim_user_ua'"
                            ).fetchone()[0] == 1


def test_no_auth_says_so_in_capitals_and_in_every_log_line(world, tmp_path):
    import subprocess
    import sys
    import time

    from tests.test_browser import free_port

    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "medsim.cli", "--database-url", world["url"], "serve",
                                 "--no-auth", "--port", str(port)], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "Uvicorn running" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    text = log.read_text()
    assert "AUTHENTICATION IS OFF" in text
    records = [ln for ln in text.splitlines() if re.search(r"\b(INFO|WARNING|ERROR)\b", ln)]  # not continuations
    assert len(records) >= 3 and all(ln.startswith("[NO AUTH] ") for ln in records), records


def test_user_list_shows_grants_and_last_use(world):
    with db.connect(world["url"], autocommit=True) as conn:
        users = {u["name"]: u for u in access.list_users(conn)}
        assert users["root"]["datasets"] == ["*"] and users["ua"]["datasets"] == [ARCHIVES["A"]]
        assert users["gone"]["live_tokens"] == 0 and users["late"]["live_tokens"] == 0
        assert users["ua"]["last_used_at"] is not None  # the matrix used it


def test_roles_come_back_after_a_restore_into_a_fresh_server(world, admin_url):
    """Users' roles are cluster-wide, outside any dump: migrating at head makes any missing."""
    from medsim import migrate

    url = create_database(admin_url, f"t_access_roles_{next(_n)}", template=None)
    migrate.upgrade(url)
    with db.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO medsim.users (name, role_name) VALUES ('restored', 'medsim_user_restored')")
        assert not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = 'medsim_user_restored'").fetchone()
    migrate.upgrade(url)  # what `medsim db restore` runs once the dump is in
    with db.connect(url, autocommit=True) as conn:
        assert conn.execute("SELECT 1 FROM pg_roles WHERE rolname = 'medsim_user_restored'").fetchone()
        conn.execute("SET ROLE medsim_user_restored")
        assert conn.execute("SELECT count(*) FROM medsim.images").fetchone() == (0,)
    assert url_for(admin_url, "x")


def sql_blocks(path, marker: str) -> list[str]:
    """The ```sql blocks of a doc that hold this marker, split into statements."""
    text = (Path(__file__).resolve().parents[1] / path).read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```sql\n")[1:]]
    block = next(b for b in blocks if marker in b)
    return [st.strip() for st in block.split(";") if st.strip() and not st.strip().startswith("--")
            or "SELECT" in st]


@pytest.mark.parametrize("doc", ["README.md", "docs/operations.md"])
def test_the_documented_access_log_queries_answer(world, doc):
    """The two questions of the docs, run as written (placeholders filled in)."""
    from tests.helpers import keyed

    with db.connect(world["url"], autocommit=True) as conn:
        image, patient = conn.execute("SELECT id, patient_key FROM medsim.images WHERE patient_key = %s LIMIT 1",
                                      (keyed("patient", "A-patient-0"),)).fetchone()
    with TestClient(create_app(ServeConfig(database_url=world["url"]))) as client:
        r = client.get(f"/images/{image}/thumbnail.png", headers={"Authorization": "Bearer " + world["tokens"]["ua"]})
        assert r.status_code == 200
    who, today = sql_blocks(doc, "interval '1 month'")
    with db.connect(world["url"], autocommit=True) as conn:
        who = re.sub(r"'<[^']*>'", f"'{patient}'", who)
        rows = conn.execute(who).fetchall()
        assert any("ua" in r and "thumbnail" in r for r in rows), rows
        seen = conn.execute(today.replace("'alice'", "'ua'")).fetchall()
        assert seen and any(image in r[-1] for r in seen)


def test_a_user_who_sees_one_percent_still_gets_k_neighbours(embedded, db_url, tmp_path):
    """HNSW with row-level security: the scan keeps going (iterative scans) until k rows
    the user may see came out, and they are the exact k nearest of those."""
    conn, _ = embedded
    root = tmp_path / "small"
    write_archive(root, "A", 24, seed=5, shared=np.zeros((16, 16), np.uint8) + 3)
    archive.ingest_archive(conn, FolderSource(root, manifest=root / "labels.csv"), "smallarchive", progress=False)
    embed_all(db_url)
    total, small = conn.execute("SELECT count(*), count(*) FILTER (WHERE d.flag = 'smallarchive') FROM "
                                "medsim.images i JOIN medsim.datasets d ON d.id = i.dataset_id").fetchone()
    assert small / total < 0.011
    access.add_user(conn, "few")
    access.grant(conn, "few", ["smallarchive"])
    queries = [r[0] for r in conn.execute("SELECT i.id FROM medsim.images i JOIN medsim.datasets d "
                                          "ON d.id = i.dataset_id WHERE d.flag <> 'smallarchive' LIMIT 5")]
    for q in queries:
        exact = conn.execute("SELECT image_id FROM medsim.similar_images(%s, 10, NULL, 'smallarchive')",
                             (q,)).fetchall()
        vector = conn.execute("SELECT embedding::text FROM medsim.embeddings WHERE image_id = %s", (q,)).fetchone()[0]
        conn.execute("SET ROLE medsim_user_few")  # the query image is not theirs: they search by its vector
        try:
            got = conn.execute("SELECT image_id FROM medsim.search_by_vector(%s::vector, 10)", (vector,)).fetchall()
        finally:
            conn.execute("RESET ROLE")
        assert len(got) == 10 and got == exact, (q, got, exact)


def test_a_stale_faiss_index_tells_a_restricted_user_no_counts(embedded, db_url, tmp_path):
    conn, mid = embedded
    faiss_index.build(conn, mid, "flat", out_dir=tmp_path)
    conn.execute("DELETE FROM medsim.embeddings WHERE image_id = (SELECT min(image_id) FROM medsim.embeddings)")
    access.add_user(conn, "part")
    access.grant(conn, "part", ["breastmnist"])
    access.add_user(conn, "whole")
    access.grant(conn, "whole", [], every=True)
    query = conn.execute("SELECT i.id FROM medsim.images i JOIN medsim.datasets d ON d.id = i.dataset_id "
                         "WHERE d.flag = 'breastmnist' AND i.split = 'test' LIMIT 1").fetchone()[0]
    with TestClient(create_app(ServeConfig(database_url=db_url))) as client:
        answers = {}
        for user in ("part", "whole"):
            h = {"Authorization": "Bearer " + access.create_token(conn, user)[0]}
            r = client.post("/search", json={"image_id": query, "k": 3, "engine": "faiss"}, headers=h)
            assert r.status_code == 409, r.text
            answers[user] = r.json()["detail"]
    assert "rows" in answers["whole"] and re.search(r"\d{3}", answers["whole"])  # the administrator's sentence
    assert not re.search(r"\d", answers["part"]) and "out of date" in answers["part"]


def test_row_level_security_reads_no_more_than_the_search(embedded, db_url):
    """The policies must not turn a search into a pass over every image: written as
    EXISTS, the embeddings policy was planned as a hashed subplan that read the whole
    images table before an HNSW scan returned 4 rows. Counted in tuples, as Postgres
    counts them, for a user granted each dataset by name (the per-row check runs)."""
    import time

    conn, _ = embedded  # 2,380 images
    access.add_user(conn, "named")
    access.grant(conn, "named", ["breastmnist", "retinamnist"])
    gid = conn.execute("SELECT min(image_id) FROM medsim.gallery").fetchone()[0]

    def read_tuples() -> int:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        return conn.execute("SELECT sum(seq_tup_read + coalesce(idx_tup_fetch, 0))::int FROM pg_stat_user_tables "
                            "WHERE schemaname = 'medsim' AND relname IN ('images', 'embeddings')").fetchone()[0]

    before = read_tuples()
    with db.connect(db_url, autocommit=True) as c:  # its counts reach the statistics when it ends
        c.execute("SET ROLE medsim_user_named")
        got = c.execute("SELECT image_id FROM medsim.similar_images(%s, 4)", (gid,)).fetchall()
    deadline = time.monotonic() + 10
    while read_tuples() == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(got) == 4
    assert read_tuples() - before < 300


def test_four_concurrent_user_adds_make_one_user(db_url):
    import subprocess
    import sys

    procs = [subprocess.Popen([sys.executable, "-m", "medsim.cli", "--database-url", db_url, "user", "add", "racer"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2, 2, 2], outs
    assert sum("exists already" in err for _, err in outs) == 3 and not any("Traceback" in e for _, e in outs)
    with db.connect(db_url, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM medsim.users WHERE name = 'racer'").fetchone() == (1,)


def test_the_service_gives_each_forward_pass_one_thread(world, monkeypatch):
    """Concurrent requests are the service's parallelism; a pass per request on every core
    oversubscribed a busy machine (issue 22). OMP_NUM_THREADS, when set, is the user's."""
    import torch

    from medsim.service.state import Service

    svc = Service(ServeConfig(database_url=world["url"]))
    torch.set_num_threads(2)
    svc.size_threads()
    assert torch.get_num_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    svc.size_threads()
    assert torch.get_num_threads() == 2
    svc.close()
    # and an upload, whose pass runs in a request thread, is still answered
    with TestClient(create_app(ServeConfig(database_url=world["url"]))) as client:
        r = client.post("/search/upload", files={"image": ("q.png", world["pngs"]["A"], "image/png")},
                        data={"k": "3"}, headers={"Authorization": "Bearer " + world["tokens"]["ua"]})
        assert r.status_code == 200 and len(r.json()["neighbours"]) == 3
