"""Issue 20, part one: ingests that stay exact under concurrency and hostile archives, one
key per database, no identifier in clear, labels that do not flip. Real files, real
processes, real Postgres."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pydicom
import pytest
from PIL import Image

from medsim import cli, db
from medsim.errors import BadArgument
from medsim.sources import archive
from medsim.sources.folder import OUTSIDE, FolderSource
from tests.conftest import TEST_KEY
from tests.helpers import image_by_path, keyed

DICOM_FILES = __import__("pathlib").Path(pydicom.__file__).parent / "data" / "test_files"


def folder(root, n: int, labels=("a", "b"), seed=0) -> list[str]:
    """n distinct small PNGs in ImageFolder layout -> their relative paths."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        label = labels[i % len(labels)]
        (root / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8)).save(root / label / f"{i}.png")
        out.append(f"{label}/{i}.png")
    return out


def medsim_cmd(*args, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "medsim.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


# ---------------------------------------------------------------- 1. concurrency
def test_four_concurrent_folder_ingests_store_each_image_once(conn, tmp_path, db_url):
    root = tmp_path / "archive"
    folder(root, 600)
    for round_ in ("new dataset", "existing dataset"):
        procs = [medsim_cmd("ingest-folder", str(root), "--name", "lab", "--quiet") for _ in range(4)]
        outs = [p.communicate(timeout=300) for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0, 0], (round_, [e[-1500:] for _, e in outs])
        assert conn.execute("SELECT count(*), count(DISTINCT sha256) FROM medsim.images").fetchone() == (600, 600)
        added = [int(o.split(" images added")[0].split()[-1]) for o, _ in outs]
        assert sum(added) == (600 if round_ == "new dataset" else 0), (round_, added)
    assert conn.execute("SELECT count(*) FROM medsim.datasets").fetchone() == (1,)
    assert conn.execute("SELECT count(*) FROM medsim.images GROUP BY split, split_index HAVING count(*) > 1"
                        ).fetchall() == []


def test_four_concurrent_npz_ingests_store_it_once(conn, synth_dir):
    procs = [medsim_cmd("ingest", "breastmnist", "--data-dir", str(synth_dir), "--accept-unofficial",
                        "--no-download", "--quiet") for _ in range(4)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [e[-1500:] for _, e in outs]
    assert conn.execute("SELECT count(*) FROM medsim.images").fetchone() == (780,)
    assert sum("780 images added" in o for o, _ in outs) == 1


# ---------------------------------------------------------------- 2. the archive's boundary
def test_nothing_outside_the_archive_is_opened_or_told(conn, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.fromarray(np.full((12, 12), 200, np.uint8)).save(outside / "secret.png")  # a decoy, a real image
    os.mkfifo(outside / "pipe.png")  # a reader that opened it would block for ever
    root = tmp_path / "archive"
    (root / "img").mkdir(parents=True)
    Image.fromarray(np.full((12, 12), 50, np.uint8)).save(root / "img" / "ok.png")
    os.symlink(outside / "secret.png", root / "img" / "link.png")
    os.symlink(outside / "pipe.png", root / "img" / "pipelink.png")
    os.symlink(outside / "nothing-here.png", root / "img" / "deadlink.png")
    os.mkfifo(root / "img" / "fifo.png")
    rows = [("img/ok.png", "x"), (str(outside / "secret.png"), "x"), (str(outside / "absent.png"), "x"),
            ("../outside/secret.png", "x"), ("../outside/absent.png", "x"), ("img/../../outside/pipe.png", "x"),
            ("img/link.png", "x"), ("img/pipelink.png", "x"), ("img/deadlink.png", "x"), ("img/fifo.png", "x"),
            ("img/missing.png", "x")]
    with open(root / "m.csv", "w") as f:
        f.write("path,label\n" + "".join(f"{p},{label}\n" for p, label in rows))
    t0 = time.monotonic()
    p = medsim_cmd("ingest-folder", str(root), "--name", "m", "--manifest", str(root / "m.csv"), "--quiet")
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert time.monotonic() - t0 < 60  # no FIFO was opened
    reasons = {line.split(": ", 2)[1]: line.split(": ", 2)[2] for line in out.splitlines()
               if line.startswith("  skipped: ")}
    for path, _ in rows[1:9]:  # outside, existing or not, through a link or not: one sentence
        assert reasons[path] == OUTSIDE, (path, reasons.get(path))
    assert reasons["img/fifo.png"] == "not a regular file" and reasons["img/missing.png"] == "no such file"
    assert "1 images added" in out
    # the ImageFolder layout: a link out of the folder (file or folder) is not followed
    tree = tmp_path / "tree"
    folder(tree, 4)
    os.symlink(outside / "secret.png", tree / "a" / "link.png")
    os.symlink(outside, tree / "b" / "linked-folder")
    src = FolderSource(tree)
    entries, problems = src.entries()
    assert {e.path for e in entries} == {"a/0.png", "a/2.png", "b/1.png", "b/3.png"}
    assert dict(problems) == {"a/link.png": OUTSIDE, "b/linked-folder": OUTSIDE}
    # ... unless asked to (a FIFO is still no image)
    entries, problems = FolderSource(tree, follow_links=True).entries()
    assert "a/link.png" in {e.path for e in entries} and "b/linked-folder/secret.png" in {e.path for e in entries}


# ---------------------------------------------------------------- 3. one database, one key
def patients_folder(root, n_patients=3, per=3, prefix="P"):
    rng = np.random.default_rng(len(prefix))
    rows = []
    (root / "img").mkdir(parents=True, exist_ok=True)
    for p in range(n_patients):
        for j in range(per):
            name = f"img/{prefix}{p}_{j}.png"
            Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8)).save(root / name)
            rows.append(f"{name},{'ab'[p % 2]},{prefix}{p}\n")
    (root / "m.csv").write_text("path,label,patient_id\n" + "".join(rows))
    return root / "m.csv"


def test_a_second_key_is_refused_and_rotation_rewrites_every_hash(conn, tmp_path, monkeypatch, capsys):
    k1, k2 = TEST_KEY, "another key, also long enough"
    first = patients_folder(tmp_path / "one")
    archive.ingest_archive(conn, FolderSource(first.parent, manifest=first), "ward", progress=False)
    assert conn.execute("SELECT count(*) FROM medsim.images").fetchone() == (9,)
    # the same patients, more images, another key: refused, nothing written
    second = patients_folder(tmp_path / "two", prefix="P")
    (tmp_path / "two" / "m.csv").write_text((tmp_path / "two" / "m.csv").read_text().replace("img/P", "img/P"))
    monkeypatch.setenv("MEDSIM_PATIENT_KEY", k2)
    with pytest.raises(BadArgument, match="hashed with another key"):
        archive.ingest_archive(conn, FolderSource(second.parent, manifest=second), "ward2", progress=False)
    assert conn.execute("SELECT count(*) FROM medsim.images").fetchone() == (9,)
    assert conn.execute("SELECT count(*) FROM medsim.datasets").fetchone() == (1,)
    assert cli.main(["delete", "--patient", "P1"]) == 2
    assert "hashed with another key" in capsys.readouterr().err
    # rotation: every stored hash moves to the chain k1 -> k2, in one transaction
    before = conn.execute("SELECT patient_key, source_path FROM medsim.images ORDER BY id").fetchall()
    monkeypatch.setenv("MEDSIM_PATIENT_KEY", k1)
    monkeypatch.setenv("MEDSIM_NEW_PATIENT_KEY", k2)
    assert cli.main(["keys", "rotate"]) == 0
    after = conn.execute("SELECT patient_key, source_path FROM medsim.images ORDER BY id").fetchall()
    assert all(a[0] != b[0] and a[1] != b[1] for a, b in zip(after, before, strict=True))
    capsys.readouterr()
    assert cli.main(["delete", "--patient", "P1"]) == 2  # k1 alone is no longer this database's key
    monkeypatch.setenv("MEDSIM_PATIENT_KEY", k2)
    assert cli.main(["delete", "--patient", "P1"]) == 2  # nor k2 alone
    monkeypatch.setenv("MEDSIM_PATIENT_KEY_PREVIOUS", k1)
    capsys.readouterr()
    assert cli.main(["delete", "--patient", "P1"]) == 0  # the chain finds all of the patient's images
    assert "deleted 3 image(s)" in capsys.readouterr().out
    archive.ingest_archive(conn, FolderSource(second.parent, manifest=second), "ward2", progress=False)
    same = conn.execute("SELECT count(DISTINCT patient_key) FROM medsim.images WHERE dataset_id = "
                        "(SELECT id FROM medsim.datasets WHERE flag = 'ward2')").fetchone()[0]
    shared = conn.execute("SELECT count(DISTINCT patient_key) FROM medsim.images").fetchone()[0]
    # P0 and P2 carry one hash in both datasets; P1 was deleted, and the chain finds their
    # tombstone: refused
    assert same == 2 and shared == 2


# ---------------------------------------------------------------- 10. no identifiers in clear
def test_no_name_record_number_birth_date_or_uid_in_a_dump(conn, tmp_path, db_url):
    ds = pydicom.dcmread(DICOM_FILES / "CT_small.dcm")
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "DOE^JOHN", "MRN-4711", "19700101"
    root = tmp_path / "pacs"
    (root / "CT").mkdir(parents=True)
    ds.save_as(root / "CT" / "DOE^JOHN_MRN-4711_1970-01-01.dcm")
    assert cli.main(["ingest-folder", str(root), "--name", "pacs", "--quiet"]) == 0
    dump = subprocess.run([db.pg_tool("pg_dump"), "--format=plain", "--data-only", "--schema=medsim", db_url],
                          capture_output=True, text=True, check=True).stdout
    assert "COPY medsim.images" in dump
    for clear in ("DOE", "JOHN", "MRN-4711", "1970", str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                  str(ds.SOPInstanceUID), str(root)):
        assert clear not in dump, clear
    row = image_by_path(conn, "CT/DOE^JOHN_MRN-4711_1970-01-01.dcm", "metadata, study_id")
    assert row[0]["SOPInstanceUID"] == keyed("uid", ds.SOPInstanceUID) and row[1].startswith("2.25.")


# ---------------------------------------------------------------- 11. labels that do not flip
def test_the_same_pixels_under_two_labels_are_a_finding_and_never_flip(conn, tmp_path, capsys):
    root = tmp_path / "archive"
    folder(root, 6, labels=("benign", "malignant"))
    shutil.copy(root / "benign" / "0.png", root / "malignant" / "copy-of-0.png")  # the BreastMNIST case
    r = archive.ingest_archive(conn, FolderSource(root), "b", progress=False)
    assert (r.added, r.label_conflicts) == (6, 1)
    [finding] = [p for p in r.problems if p.kind == "label_conflict"]
    assert finding.path == "malignant/copy-of-0.png" and "the same pixels as benign/0.png" in finding.text()
    label = lambda: image_by_path(conn, "benign/0.png", "medsim.label_name(dataset_id, labels)")[0]  # noqa: E731
    assert label() == "benign"  # the first file in path order gives the label
    for option in ("keep", "relabel", "relabel"):  # re-runs of the unchanged folder change nothing
        again = archive.ingest_archive(conn, FolderSource(root), "b", on_conflict=option, progress=False)
        assert (again.added, again.relabelled, again.label_conflicts) == (0, 0, 1) and label() == "benign"
    (root / "benign" / "0.png").unlink()  # now the source agrees: malignant
    kept = archive.ingest_archive(conn, FolderSource(root), "b", progress=False)
    assert (kept.label_changes, kept.relabelled) == (1, 0) and label() == "benign"
    assert "--on-conflict relabel applies it" in [p for p in kept.problems if p.kind == "label_changed"][0].text()
    assert cli.main(["ingest-folder", str(root), "--name", "b", "--on-conflict", "relabel", "--quiet"]) == 0
    assert "1 label change(s) (1 applied)" in capsys.readouterr().out and label() == "malignant"
    final = archive.ingest_archive(conn, FolderSource(root), "b", on_conflict="relabel", progress=False)
    assert (final.label_changes, final.relabelled) == (0, 0) and label() == "malignant"
    assert conn.execute("SELECT count(*) FROM medsim.ingest_problems WHERE kind = 'label_conflict'").fetchone() == (4,)


# ---------------------------------------------------------------- 13. smaller ones
def test_an_archive_is_its_name_whatever_max_side_says(conn, tmp_path, capsys):
    root = tmp_path / "archive"
    folder(root, 8)
    assert cli.main(["ingest-folder", str(root), "--name", "lab", "--max-side", "64", "--quiet"]) == 0
    capsys.readouterr()
    assert cli.main(["ingest-folder", str(root), "--name", "lab", "--max-side", "128", "--quiet"]) == 2
    assert "lab was ingested with --max-side 64; re-run with that" in capsys.readouterr().err
    assert cli.main(["ingest-folder", str(root), "--name", "lab", "--quiet"]) == 0  # the dataset's own
    assert "8 file(s) unchanged since an earlier run: not read again" in capsys.readouterr().out
    assert conn.execute("SELECT count(*) FROM medsim.datasets").fetchone() == (1,)


def test_a_killed_ingest_leaves_no_decoder_and_its_report_is_marked(conn, tmp_path, db_url):
    import psutil

    root = tmp_path / "archive"
    folder(root, 3000)
    p = medsim_cmd("ingest-folder", str(root), "--name", "big", "--quiet")
    deadline = time.monotonic() + 120
    children = []
    while time.monotonic() < deadline and not (children and conn.execute(
            "SELECT count(*) FROM medsim.ingest_reports WHERE status = 'running'").fetchone()[0]):
        children = psutil.Process(p.pid).children(recursive=True)
        time.sleep(0.1)
    assert children, "the ingest started no decoding process"
    p.kill()
    p.communicate(timeout=30)
    gone, alive = psutil.wait_procs(children, timeout=20)
    assert alive == [], "decoding processes outlived the ingest they served"
    assert conn.execute("SELECT status FROM medsim.ingest_reports").fetchall() == [("running",)]
    folder(tmp_path / "small", 2)
    archive.ingest_archive(conn, FolderSource(tmp_path / "small"), "small", progress=False)
    assert conn.execute("SELECT status FROM medsim.ingest_reports ORDER BY id").fetchall() == [
        ("interrupted",), ("done",)]
