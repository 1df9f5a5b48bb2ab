"""DICOM through pydicom's own test files (real CT, MR, US, RGB, YBR, palette, RLE, JPEG,
multi-frame): display values, one image per frame, per-file errors for codecs that are
not installed, and nothing identifying stored."""

from __future__ import annotations

import hashlib
import hmac
import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medsim import cli, images
from medsim.sources import archive, dicom
from medsim.sources.base import Entry
from medsim.sources.folder import FolderSource
from tests.helpers import embed_all, image_by_path, keyed, register_model

FILES = Path(pydicom.__file__).parent / "data" / "test_files"
KEY = "a test key that is long enough"
CHOSEN = {  # label folder -> files
    "ct": ["CT_small.dcm", "MR_small.dcm"],
    "colour": ["SC_rgb_rle.dcm", "examples_rgb_color.dcm", "examples_palette.dcm", "examples_jpeg2k.dcm"],
    "cine": ["examples_ybr_color.dcm"],  # 30 frames
    "broken": ["MR_truncated.dcm", "JPEG-lossy.dcm", "rtplan.dcm"],  # truncated, no codec, no image
}


@pytest.fixture
def dicom_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSIM_PATIENT_KEY", KEY)
    root = tmp_path / "pacs"
    for label, names in CHOSEN.items():
        (root / label).mkdir(parents=True)
        for n in names:
            shutil.copy(FILES / n, root / label / n)
    shutil.copy(FILES / "CT_small.dcm", root / "ct" / "no_suffix")  # PACS exports often have none
    return root


def read(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(FILES / name)


def test_dicom_folder_ingest(conn, dicom_folder, db_url):
    r = archive.ingest_archive(conn, FolderSource(dicom_folder, max_side=128), "pacs", progress=False)
    reasons = {p.split("/")[-1]: why for p, kind, why in r.problems if kind == "skipped"}
    # the syntax, its UID, and what each installed decoder said (this file is damaged, not
    # merely without a codec: pylibjpeg's libjpeg and Pillow are installed; GDCM is not
    # asked where they are, since it aborts the process on a corrupt JPEG: test_bombs.py)
    lossy = reasons["JPEG-lossy.dcm"]
    assert "cannot decode its pixels (JPEG Extended (Process 2 and 4) (1.2.840.10008.1.2.4.51))" in lossy
    assert "pylibjpeg" in lossy and "gdcm" not in lossy and "missing dependencies" not in lossy
    assert "cannot decode its pixels" in reasons["MR_truncated.dcm"]
    assert reasons["rtplan.dcm"] == ("a RT Plan object (SOP class 1.2.840.10008.5.1.4.1.1.481.5), not an image to "
                                     "search: refused")
    # 2 + 4 colour + 30 frames, less the duplicates: the copy without a suffix, and two
    # frames of the cine clip that repeat the frame before them pixel for pixel
    assert r.added == 2 + 4 + 28 and r.duplicates == 3
    dup = {p: why for p, kind, why in r.problems if kind == "duplicate"}
    assert dup["ct/no_suffix"] == "the same pixels as ct/CT_small.dcm"
    assert dup["cine/examples_ybr_color.dcm#frame11"] == "the same pixels as cine/examples_ybr_color.dcm#frame10"
    assert conn.execute("SELECT source_kind FROM medsim.datasets").fetchone() == ("dicom",)
    frames = conn.execute("SELECT count(*), count(DISTINCT height * 10000 + width) FROM medsim.images "
                          "WHERE source_path = ANY(%s)",
                          ([keyed("path", f"cine/examples_ybr_color.dcm#frame{i}") for i in range(30)],)).fetchone()
    assert frames == (28, 1)
    ct = image_by_path(conn, "ct/CT_small.dcm", "bit_depth, channels, metadata, study_id, patient_key")
    ds = read("CT_small.dcm")
    assert ct[0] == 16 and ct[1] == 1
    uids = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")  # kept only keyed, as 2.25 UIDs
    assert ct[2] == {t: keyed("uid", str(ds.get(t))) if t in uids else str(ds.get(t))
                     for t in dicom.KEPT_TAGS if ds.get(t) not in (None, "")}
    assert ct[3] == keyed("uid", ds.StudyInstanceUID) and ds.StudyInstanceUID not in str(ct)
    assert ct[4] == hmac.new(KEY.encode(), str(ds.PatientID).encode(), hashlib.sha256).hexdigest()
    # nothing identifying: no name, birth date or raw patient id anywhere in the rows
    text = " ".join(str(v) for row in conn.execute("SELECT * FROM medsim.images").fetchall()
                    for v in row if not isinstance(v, bytes | memoryview))
    for tag in ("PatientName", "PatientBirthDate", "PatientID"):
        value = str(read("CT_small.dcm").get(tag, "") or "")
        assert not value or value not in text, tag
    assert conn.execute("SELECT count(*) FROM medsim.images WHERE channels = 3").fetchone()[0] == 4 + 28
    # they embed like any other image
    mid = register_model(conn)
    embed_all(db_url)
    assert conn.execute("SELECT count(*) FROM medsim.embeddings WHERE model_id = %s", (mid,)).fetchone() == (34,)


def test_display_values_rescale_window_and_monochrome1(tmp_path):
    ds = read("CT_small.dcm")
    x2 = images.read(FILES / "CT_small.dcm")[..., 0]
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    # rescaled to Hounsfield units, then stretched: the order of values is the HU order
    assert x2.dtype == np.uint16 and x2.max() == 65535 and x2.min() == 0
    assert np.array_equal(np.argsort(x2.ravel(), kind="stable"), np.argsort(hu.ravel(), kind="stable"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "m1.dcm")
    x1 = images.read(tmp_path / "m1.dcm")[..., 0]
    assert np.array_equal(x1.astype(int), 65535 - x2.astype(int))  # inverted


def test_label_tag_and_frames_from_the_header_alone(dicom_folder):
    src = FolderSource(dicom_folder, label_tag="Modality")
    entries, problems = src.entries()
    labels = {e.file: e.labels for e in entries}
    assert labels["ct/CT_small.dcm"] == ("CT",) and labels["ct/MR_small.dcm"] == ("MR",)
    assert sum(1 for e in entries if e.file == "cine/examples_ybr_color.dcm") == 30
    assert isinstance(entries[0], Entry) and all(e.patient_id is None or e.patient_id for e in entries)


def test_cli_ingest_folder_with_dicom(conn, dicom_folder, capsys):
    assert cli.main(["ingest-folder", str(dicom_folder), "--name", "pacs", "--label-tag", "Modality",
                     "--max-side", "64", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "pacs: 34 images added" in out and "skipped: broken/JPEG-lossy.dcm: cannot decode its pixels" in out
    names = conn.execute("SELECT DISTINCT medsim.label_name(dataset_id, labels) FROM medsim.images ORDER BY 1").fetchall()
    assert {n for (n,) in names} >= {"CT", "MR", "US"}


def test_every_one_of_pydicoms_sample_files_gets_an_image_or_one_sentence(conn, tmp_path, monkeypatch):
    """All of pydicom's test files (176 with the DICOMDIR tree), as one archive: the codecs
    medsim declares decode every compressed syntax there is (JPEG Baseline/Extended/Lossless,
    JPEG-LS, JPEG 2000, RLE, deflate); what is refused is refused in one sentence that says
    why, never pydicom's "use force=True" or a dangling "missing dependencies:"; objects that
    are not pictures are refused by SOP class; a re-run reads none of the settled files."""
    monkeypatch.setenv("MEDSIM_PATIENT_KEY", KEY)
    root = tmp_path / "samples"
    shutil.copytree(FILES, root / "all")
    n_files = sum(1 for p in (root / "all").rglob("*") if p.is_file())
    assert n_files >= 170
    r = archive.ingest_archive(conn, FolderSource(root, max_side=64), "samples", progress=False)
    reasons = {p.split("/", 1)[1]: why for p, kind, why in r.problems if kind == "skipped"}
    for name, why in reasons.items():
        assert "\n" not in why and not why.rstrip().endswith(":"), (name, why)
        assert "force=True" not in why and "missing dependencies" not in why and "no decoder" not in why, (name, why)
    for name in ("JPGExtended.dcm", "JPEGLSNearLossless_08.dcm", "JPEGLSNearLossless_16.dcm",
                 "MR_small_jpeg_ls_lossless.dcm", "SC_rgb_jls_lossy_line.dcm", "MR_small_jp2klossless.dcm",
                 "693_J2KI.dcm", "SC_rgb_rle_16bit.dcm", "image_dfl.dcm", "MR_small_implicit.dcm"):
        assert name not in reasons, (name, reasons.get(name))
    by_class = {"rtdose.dcm": "a RT Dose object", "rtplan.dcm": "a RT Plan object",
                "rtstruct.dcm": "a RT Structure Set object", "test-SR.dcm": "a Structured Report object",
                "waveform_ecg.dcm": "a Waveform object", "ExplVR_BigEndNoMeta.dcm": "a RT Ion Plan object"}
    for name, start in by_class.items():  # the last has no File Meta: read anyway, then refused by class
        assert reasons[name].startswith(start) and "not an image to search: refused" in reasons[name], name
    assert reasons["no_meta.dcm"].startswith("not a DICOM file: no File Meta header")
    damaged = {n for n, why in reasons.items() if why.startswith("cannot decode its pixels")}
    assert damaged == {"JPEG-lossy.dcm", "JPEG2000-embedded-sequence-delimiter.dcm", "MR_truncated.dcm"}
    assert r.added >= 80
    again = archive.ingest_archive(conn, FolderSource(root, max_side=64), "samples", progress=False)
    assert again.added == again.unchanged == again.duplicates == 0
    assert again.unchanged_files == n_files - len(reasons) + len(damaged)  # damaged files are settled too


def test_a_multiframe_file_is_decoded_once_for_all_its_frames(conn, tmp_path, monkeypatch):
    from pydicom.uid import RLELossless

    from medsim.images import dicom as render

    monkeypatch.setenv("MEDSIM_PATIENT_KEY", KEY)
    (tmp_path / "cine").mkdir()
    ds = read("examples_ybr_color.dcm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frames = ds.pixel_array  # RGB, as pydicom converts them
    ds.PhotometricInterpretation = "RGB"
    ds.compress(RLELossless, frames, generate_instance_uid=False)  # a compressed 30-frame cine
    ds.save_as(tmp_path / "cine" / "clip.dcm")
    calls, real = [], render.render_frames

    def counted(d, frames, *args, **kwargs):
        calls.append(len(frames))
        return real(d, frames, *args, **kwargs)

    monkeypatch.setattr(render, "render_frames", counted)
    r = archive.ingest_archive(conn, FolderSource(tmp_path), "cine", progress=False, workers=1)
    assert r.listed == 30 and r.added + r.duplicates == 30
    assert calls == [30]  # one decode of the file, each of its 30 frames once


def test_an_admin_finds_the_file_an_image_came_from(conn, dicom_folder, tmp_path, capsys):
    """Paths are stored keyed; `medsim keys locate` hashes the folder's paths until one matches
    (a frame's index is in the image's metadata)."""
    archive.ingest_archive(conn, FolderSource(dicom_folder, max_side=64), "pacs", progress=False)
    frame = image_by_path(conn, "cine/examples_ybr_color.dcm#frame5")[0]
    ct = image_by_path(conn, "ct/CT_small.dcm")[0]
    for image_id, rel in ((frame, "cine/examples_ybr_color.dcm#frame5"), (ct, "ct/CT_small.dcm")):
        assert cli.main(["keys", "locate", str(image_id), "--in", str(dicom_folder)]) == 0
        assert capsys.readouterr().out.strip() == str(dicom_folder / rel)
    (tmp_path / "elsewhere").mkdir()
    assert cli.main(["keys", "locate", str(ct), "--in", str(tmp_path / "elsewhere")]) == 2
    assert "no file under" in capsys.readouterr().err
