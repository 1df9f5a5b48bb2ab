import hashlib

import numpy as np
import pytest

from medsim import cli
from medsim.errors import DataMissing, DataRefused
from medsim.sources import ingest, medmnist
from tests import synth


def counts(conn):
    return (conn.execute("SELECT count(*) FROM medsim.datasets").fetchone()[0],
            conn.execute("SELECT count(*) FROM medsim.images").fetchone()[0])


def split_counts(conn, flag):
    return dict(conn.execute(
        "SELECT split, count(*) FROM medsim.images i JOIN medsim.datasets d ON d.id = i.dataset_id "
        "WHERE d.flag = %s GROUP BY split", (flag,)).fetchall())


@pytest.mark.parametrize("flag", ["breastmnist", "retinamnist"])  # grey, colour
def test_ingest_counts_and_byte_exact_round_trip(conn, synth_dir, flag):
    r = ingest.ingest(conn, flag, data_dir=synth_dir, accept_unofficial=True, allow_download=False,
                      show_progress=False)
    e = medmnist.entry(flag)
    assert r.added == sum(e.n_samples.values())
    assert split_counts(conn, flag) == e.n_samples
    arrays = np.load(synth_dir / e.filename)
    for split in medmnist.SPLITS:
        rows = conn.execute(
            "SELECT split_index, labels, height, width, channels, pixels, sha256 FROM medsim.images i "
            "JOIN medsim.datasets d ON d.id = i.dataset_id WHERE d.flag = %s AND split = %s "
            "ORDER BY split_index", (flag, split)).fetchall()
        x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        assert [r[0] for r in rows] == list(range(len(x)))
        for idx in (0, len(x) // 2, len(x) - 1):
            _, labels, h, w, c, pixels, sha = rows[idx]
            assert labels == [int(v) for v in y[idx]]
            assert (h, w, c) == (28, 28, e.n_channels)
            decoded = np.frombuffer(pixels, np.uint8).reshape(x[idx].shape)
            assert np.array_equal(decoded, x[idx])
            assert sha == hashlib.sha256(x[idx].tobytes()).digest()
    ds = conn.execute("SELECT md5_official, source_md5, official_md5, license, label_names "
                      "FROM medsim.datasets WHERE flag = %s", (flag,)).fetchone()
    assert ds[0] is False and ds[1] == medmnist.file_md5(synth_dir / e.filename) and ds[2] == e.md5
    assert ds[3] == e.license and ds[4] == e.label_names


def test_reingest_adds_nothing(conn, synth_dir):
    first = ingest.ingest(conn, "breastmnist", data_dir=synth_dir, accept_unofficial=True,
                          show_progress=False)
    again = ingest.ingest(conn, "breastmnist", data_dir=synth_dir, accept_unofficial=True,
                          show_progress=False)
    assert first.added == 780 and again.added == 0 and again.total == 780
    assert "0 added" in again.line()
    assert counts(conn) == (1, 780)


def test_official_md5_is_recorded_as_official(conn, synth_dir, monkeypatch):
    info = medmnist._medmnist_info().INFO
    monkeypatch.setitem(info, "breastmnist", dict(info["breastmnist"], MD5=medmnist.file_md5(synth_dir / "breastmnist.npz")))
    r = ingest.ingest(conn, "breastmnist", data_dir=synth_dir, show_progress=False)
    assert r.official and r.added == 780
    assert conn.execute("SELECT md5_official FROM medsim.datasets").fetchone()[0] is True


def test_unofficial_needs_the_flag(conn, synth_dir):
    with pytest.raises(DataRefused, match="--accept-unofficial"):
        ingest.ingest(conn, "breastmnist", data_dir=synth_dir, show_progress=False)
    assert counts(conn) == (0, 0)


def bad_file(tmp_path, kind):
    e = medmnist.entry("breastmnist")
    a = synth.make_arrays("breastmnist")
    if kind == "counts":
        a["val_images"], a["val_labels"] = a["val_images"][:-1], a["val_labels"][:-1]
    elif kind == "shape":
        a["train_images"] = a["train_images"][:, :27, :27]
    elif kind == "dtype":
        a["test_images"] = a["test_images"].astype(np.float32)
    elif kind == "missing_key":
        del a["test_labels"]
    elif kind == "label_range":
        a["train_labels"][5, 0] = 2  # breastmnist has 2 classes
    elif kind == "corrupt":
        (tmp_path / e.filename).write_bytes(b"PK\x03\x04 this is not a zip file")
        return
    np.savez(tmp_path / e.filename, **a)


@pytest.mark.parametrize("kind", ["counts", "shape", "dtype", "missing_key", "label_range", "corrupt"])
def test_refusals_write_nothing(conn, tmp_path, kind):
    bad_file(tmp_path, kind)
    with pytest.raises(DataRefused):
        ingest.ingest(conn, "breastmnist", data_dir=tmp_path, accept_unofficial=True,
                      allow_download=False, show_progress=False)
    assert counts(conn) == (0, 0)


def test_missing_file_message_names_file_dirs_and_url(conn, tmp_path, monkeypatch):
    import urllib.error

    def offline(*a, **k):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(medmnist.urllib.request, "urlopen", offline)
    with pytest.raises(DataMissing) as err:
        ingest.ingest(conn, "dermamnist", data_dir=tmp_path, show_progress=False)
    msg = str(err.value)
    assert "dermamnist.npz" in msg and str(tmp_path) in msg
    assert medmnist.entry("dermamnist").url in msg and "download failed" in msg
    assert counts(conn) == (0, 0)


def test_download_verifies_md5(tmp_path, monkeypatch):
    import io

    payload = b"not the real file"
    monkeypatch.setattr(medmnist.urllib.request, "urlopen", lambda *a, **k: io.BytesIO(payload))
    with pytest.raises(DataRefused, match="md5"):
        medmnist.download(medmnist.entry("breastmnist"), tmp_path)
    assert list(tmp_path.iterdir()) == []  # no partial file left behind


def test_failure_mid_copy_leaves_no_partial_dataset(conn, synth_dir, monkeypatch):
    real = ingest.encode_copy_rows

    def fail_on_test_split(ds, split, x, y, start=0):
        if split == "test":
            raise RuntimeError("disk on fire")
        return real(ds, split, x, y, start)

    monkeypatch.setattr(ingest, "encode_copy_rows", fail_on_test_split)
    with pytest.raises(RuntimeError):
        ingest.ingest(conn, "breastmnist", data_dir=synth_dir, accept_unofficial=True, show_progress=False)
    assert counts(conn) == (0, 0)


def test_different_file_for_same_dataset_is_refused(conn, synth_dir, tmp_path):
    ingest.ingest(conn, "breastmnist", data_dir=synth_dir, accept_unofficial=True, show_progress=False)
    synth.write_npz(tmp_path, "breastmnist", seed=99)
    with pytest.raises(DataRefused, match="different file"):
        ingest.ingest(conn, "breastmnist", data_dir=tmp_path, accept_unofficial=True, show_progress=False)
    assert counts(conn) == (1, 780)


def test_unknown_flag(conn):
    with pytest.raises(ValueError, match="unknown 2D MedMNIST flag"):
        ingest.ingest(conn, "organmnist3d", show_progress=False)


def test_label_name_sql_function(conn, synth_dir):
    ingest.ingest(conn, "breastmnist", data_dir=synth_dir, accept_unofficial=True, show_progress=False)
    names = dict(conn.execute(
        "SELECT labels[1], medsim.label_name(dataset_id, labels) FROM medsim.images GROUP BY 1, 2").fetchall())
    assert names == {0: "malignant", 1: "normal, benign"}


def test_cli_ingest_reports_and_exit_codes(db_url, synth_dir, capsys):
    rc = cli.main(["ingest", "breastmnist", "--data-dir", str(synth_dir), "--accept-unofficial", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0 and "780 images added" in out and "train     546" in out
    rc = cli.main(["ingest", "breastmnist", "--data-dir", str(synth_dir), "--quiet"])
    assert rc == 2 and "not the official" in capsys.readouterr().err
    rc = cli.main(["ingest", "dermamnist", "--data-dir", str(synth_dir), "--no-download", "--quiet"])
    assert rc == 2 and "dermamnist.npz" in capsys.readouterr().err


def test_chunked_copy_keeps_split_indexes_and_pixels(conn, synth_dir, monkeypatch):
    monkeypatch.setattr(ingest, "CHUNK_ROWS", 100)  # many chunks per split
    ingest.ingest(conn, "retinamnist", data_dir=synth_dir, accept_unofficial=True, show_progress=False)
    arrays = np.load(synth_dir / "retinamnist.npz")
    for split in medmnist.SPLITS:
        rows = conn.execute("SELECT split_index, pixels FROM medsim.images WHERE split = %s ORDER BY split_index",
                            (split,)).fetchall()
        x = arrays[f"{split}_images"]
        assert [r[0] for r in rows] == list(range(len(x)))
        assert all(bytes(r[1]) == x[r[0]].tobytes() for r in rows)
