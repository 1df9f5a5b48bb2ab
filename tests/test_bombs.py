"""Issue 34 (2, 3, 8): files and PACS answers built to hurt. A 2.3 KB DICOM claiming a
million frames is refused from its header, named and settled, in ingest-folder (in a
process whose memory is capped) and in a sync (a real Orthanc); a NumberOfFrames of -3 is
named; what C decoders print lands in medsim's report, not the terminal, and a corrupt JPEG
no longer aborts the process through GDCM; a DICOMweb server answering odd JSON is one
sentence naming it (a tiny server on 127.0.0.1), and a URL without /dicom-web says what to
try."""

from __future__ import annotations

import http.server
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from medsim import cli
from medsim.errors import PacsUnavailable
from medsim.sources import archive, pacs
from medsim.sources.folder import FolderSource
from tests import orthanc

FILES = Path(pydicom.__file__).parent / "data" / "test_files"
KEY = "a test key that is long enough"
MILLION = 1_000_000


def dicom_file(frames, rows: int = 64, cols: int = 64, jpeg: bytes | None = None) -> bytes:
    """A small Secondary Capture file with NumberOfFrames written as given (a number, or
    any text), one frame of pixels (or the JPEG given, encapsulated)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import (
        ExplicitVRLittleEndian,
        JPEGBaseline8Bit,
        SecondaryCaptureImageStorage,
        generate_uid,
    )

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit if jpeg else ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    sop = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, sop
    ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = "P-bomb", generate_uid(), generate_uid()
    ds.StudyDate, ds.Modality, ds.StudyDescription = "20260101", "OT", "bomb"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.NumberOfFrames = 7  # rewritten below, byte for byte
    if jpeg:
        ds.PixelData = encapsulate([jpeg])
        ds["PixelData"].VR = "OB"
    else:
        ds.PixelData = (np.arange(rows * cols) % 251).astype(np.uint8).tobytes()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    data = out.getvalue()
    at = data.index(b"\x28\x00\x08\x00IS")
    value = str(frames).encode()
    value += b" " * (len(value) % 2)
    return data[:at + 6] + len(value).to_bytes(2, "little") + value + data[at + 10:]


def test_the_bomb_is_tiny_and_says_a_million_frames():
    data = dicom_file(MILLION)
    assert len(data) < 6000
    assert pydicom.dcmread(io.BytesIO(data)).NumberOfFrames == MILLION


def capped(cmd: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    """A medsim command in a process whose address space is capped at 3 GB: the old reader
    listed a million entries (1.5 GB after 30 s and rising)."""
    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, preexec_fn=cap)


def test_a_million_frame_file_is_refused_from_its_header_named_and_the_run_ends(conn, db_url, tmp_path):
    root = tmp_path / "archive"
    (root / "ct").mkdir(parents=True)
    (root / "ct" / "bomb.dcm").write_bytes(dicom_file(MILLION))
    Image.fromarray((np.arange(32 * 32) % 200).astype(np.uint8).reshape(32, 32)).save(root / "ct" / "fine.png")
    env = {**os.environ, "MEDSIM_PATIENT_KEY": KEY, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "medsim", "--database-url", db_url, "ingest-folder", str(root), "--name", "bombs"]
    t0 = time.monotonic()
    try:
        done = capped(cmd, env, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("ingest-folder did not end within 90 s")
    assert time.monotonic() - t0 < 60
    assert done.returncode == 0, done.stderr[-2000:]
    assert "1 images added" in done.stdout
    assert ("skipped: ct/bomb.dcm: it claims 1,000,000 frames, over the limit of 10,000 for one file: refused "
            "before reading them") in done.stdout
    assert done.stderr.strip() == "" or "Traceback" not in done.stderr, done.stderr
    status = conn.execute("SELECT status, skipped FROM medsim.ingest_reports ORDER BY id DESC LIMIT 1").fetchone()
    assert status == ("done", 1)
    reason = conn.execute("SELECT reason FROM medsim.ingest_problems").fetchone()[0]
    assert reason.startswith("it claims 1,000,000 frames")


@pytest.mark.parametrize("frames", [20, 5000])
def test_frames_the_file_cannot_hold_are_refused_before_any_is_listed(conn, tmp_path, monkeypatch, frames):
    """Under the frame limit, but more frames than the file's bytes hold: refused from the
    header against the file's size (20 frames of 64 x 64 are 81,920 bytes; the file is 5)."""
    monkeypatch.setenv("MEDSIM_PATIENT_KEY", KEY)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f.dcm").write_bytes(dicom_file(frames))
    r = archive.ingest_archive(conn, FolderSource(tmp_path), "f", progress=False, workers=1)
    assert r.listed == 0 and r.added == 0
    (path, kind, why), = r.problems
    assert (path, kind) == ("a/f.dcm", "skipped")
    assert why.startswith(f"it claims {frames:,} frames of 64 x 64 ({frames * 4096:,} bytes of pixel data), but the "
                          f"whole file is ") and why.endswith("bytes: refused before reading them")


def test_a_dataset_fetched_whole_is_held_to_its_pixel_data_before_decoding():
    """What WADO-RS gives (a Dataset, no file size): the frames are checked against the
    pixel data itself, native and compressed, before pydicom decodes a byte."""
    from medsim.images import dicom as render

    native = pydicom.dcmread(io.BytesIO(dicom_file(MILLION)))
    with pytest.raises(render.Unreadable, match="1,000,000 frame"):
        render.read_frames(native, [0], 40_000_000)
    jpeg = io.BytesIO()
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(jpeg, "JPEG")
    packed = pydicom.dcmread(io.BytesIO(dicom_file(5, jpeg=jpeg.getvalue())))
    with pytest.raises(render.Unreadable, match="it claims 5 frames but its pixel data holds 1 fragment"):
        render.read_frames(packed, [0], 40_000_000)


def test_a_frame_count_that_is_not_one_is_named_with_its_reason(conn, tmp_path, monkeypatch):
    """-3 was listed as no entries and dropped unnamed ("no image files found"); text is not
    a count either. 0 is one frame, as pydicom reads it, and is stored."""
    monkeypatch.setenv("MEDSIM_PATIENT_KEY", KEY)
    (tmp_path / "x").mkdir()
    for name, frames in (("minus.dcm", -3), ("text.dcm", "ab"), ("zero.dcm", 0)):
        (tmp_path / "x" / name).write_bytes(dicom_file(frames))
    r = archive.ingest_archive(conn, FolderSource(tmp_path), "frames", progress=False, workers=1)
    reasons = {p: why for p, kind, why in r.problems if kind == "skipped"}
    assert reasons == {
        "x/minus.dcm": "NumberOfFrames -3 is not a number of frames (DICOM requires 1 or more): refused",
        "x/text.dcm": "NumberOfFrames 'ab' is not a number of frames: refused"}
    assert r.added == 1


def test_alone_a_minus_three_file_is_named_not_no_image_files_found(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEDSIM_PATIENT_KEY", KEY)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "minus.dcm").write_bytes(dicom_file(-3))
    entries, problems = FolderSource(tmp_path).entries()
    assert entries == [] and problems == [
        ("x/minus.dcm", "NumberOfFrames -3 is not a number of frames (DICOM requires 1 or more): refused")]


# ---------------------------------------------------------------- decoders' own words
def corrupt_jpeg() -> bytes:
    """A baseline JPEG with three stray bytes before its scan: libjpeg warns ("Corrupt JPEG
    data: 3 extraneous bytes"), and GDCM's copy of it then throws a C++ exception nothing
    catches (the process aborts)."""
    out = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)).save(out, "JPEG")
    data = out.getvalue()
    at = data.index(b"\xff\xda")
    return data[:at] + b"\x00\x11\x22" + data[at:]


# GDCM alone decodes JPEG 2000 here, as where pylibjpeg and Pillow are not installed: its
# bundled OpenJPEG prints "Invalid number of tiles" for pydicom's damaged sample
GDCM_ONLY = """
import sys
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import JPEG2000
for plugin in ("pylibjpeg", "pillow"):
    get_decoder(JPEG2000).remove_plugin(plugin)
from medsim import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def test_decoder_chatter_goes_into_the_report_and_nothing_aborts(conn, db_url, tmp_path):
    root = tmp_path / "archive"
    (root / "odd").mkdir(parents=True)
    shutil.copy(FILES / "JPEG2000-embedded-sequence-delimiter.dcm", root / "odd" / "tiles.dcm")
    (root / "odd" / "corrupt.dcm").write_bytes(dicom_file(1, jpeg=corrupt_jpeg()))
    env = {**os.environ, "MEDSIM_PATIENT_KEY": KEY, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, "-c", GDCM_ONLY, "--database-url", db_url, "ingest-folder", str(root),
                           "--name", "odd"], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])  # was -6: SIGABRT from GDCM
    assert "Invalid number of tiles" not in done.stderr and "Marker handler" not in done.stderr, done.stderr
    assert "Corrupt JPEG" not in done.stderr and "terminate called" not in done.stderr, done.stderr
    lines = [x.strip() for x in done.stdout.splitlines()]
    tiles = next(x for x in lines if x.startswith("skipped: odd/tiles.dcm: cannot decode its pixels"))
    assert tiles.endswith("(the decoder said: Invalid number of tiles : 14540801 x 1 (maximum fixed by jpeg2000 "
                          "norm is 65535 tiles) / Marker handler function failed to read the marker segment)"), tiles
    assert "1 images added" in lines[0]
    reason = conn.execute("SELECT reason FROM medsim.ingest_problems WHERE reason LIKE 'cannot decode%'").fetchone()
    assert "the decoder said: Invalid number of tiles" in reason[0]


def test_a_decoder_note_on_a_file_it_decoded_is_its_report_line(conn, tmp_path, monkeypatch):
    """What a decoder printed while decoding a file it did decode (a libjpeg warning): one
    line of the printed report; ingest_problems keeps only the kinds its schema knows."""
    from medsim.sources import folder

    monkeypatch.setenv("MEDSIM_PATIENT_KEY", KEY)
    (tmp_path / "a").mkdir()
    Image.fromarray(np.full((16, 16), 9, np.uint8)).save(tmp_path / "a" / "x.png")
    real = folder.load_image

    def noisy(path, max_side):
        got = real(path, max_side)
        got.note = "the decoder said: Corrupt JPEG data: 3 extraneous bytes before marker 0xda"
        return got

    monkeypatch.setattr(folder, "load_image", noisy)
    r = archive.ingest_archive(conn, FolderSource(tmp_path), "noisy", progress=False, workers=1)
    assert r.added == 1
    assert "  decoder: a/x.png: the decoder said: Corrupt JPEG data: 3 extraneous bytes before marker 0xda" in r.lines()
    assert conn.execute("SELECT status FROM medsim.ingest_reports").fetchone() == ("done",)


def test_the_query_paths_neither_abort_nor_print(tmp_path, capfd):
    """Search by file and uploads read through images.read: the corrupt JPEG that made GDCM
    abort the process (the service's, for an upload) decodes, and the terminal stays clean."""
    from medsim import images

    with pytest.raises(images.Unreadable, match="cannot decode its pixels"):
        images.read(FILES / "JPEG2000-embedded-sequence-delimiter.dcm")
    x = images.read(dicom_file(1, jpeg=corrupt_jpeg()))
    assert x.shape == (64, 64, 1)
    out, err = capfd.readouterr()
    assert err == "" and out == ""


# ---------------------------------------------------------------- a PACS answering nonsense
class OddPacs:
    """A tiny DICOMweb impostor on 127.0.0.1: every GET answers `body` as JSON (or `status`)."""

    def __init__(self, body, status: int = 200, prefix: str = "/dicom-web"):
        self.body, self.status = body, status
        odd = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                data = json.dumps(odd.body).encode() if odd.status == 200 else b"Bad Request"
                self.send_response(odd.status)
                self.send_header("Content-Type", "application/dicom+json" if odd.status == 200 else "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}{prefix}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


UID = {"0020000D": {"vr": "UI", "Value": ["1.2.3"]}, "0020000E": {"vr": "UI", "Value": ["1.2.3.4"]},
       "00080018": {"vr": "UI", "Value": ["1.2.3.4.5"]}}


@pytest.mark.parametrize("body, says", [
    ([{"foo": "bar"}, 17, None], "item 1 has 'foo', which is not a DICOM tag"),
    ("hello", "the JSON string 'hello' where QIDO-RS answers a list of DICOM JSON objects"),
    ({}, "item 1 holds no StudyInstanceUID"),
    ({"status": "ok"}, "item 1 has 'status', which is not a DICOM tag"),
    ([UID, 17], "item 2 of the list is the number 17, not a DICOM JSON object"),
    ([{"0020000D": "1.2.3"}], "item 1's attribute 0020000D is the JSON string '1.2.3', not an object with its VR"),
])
def test_odd_json_from_a_dicomweb_server_is_one_sentence_naming_it(conn, monkeypatch, capsys, body, says):
    monkeypatch.setenv("MEDSIM_PATIENT_KEY", KEY)
    odd = OddPacs(body)
    try:
        with pytest.raises(PacsUnavailable) as got:
            pacs.sync(conn, odd.url, "odd", label_tag="StudyDescription", workers=1)
        text = str(got.value)
        assert text.startswith(f"the PACS at {odd.url} sent a malformed answer while searching instances: ")
        assert says in text and "\n" not in text, text
        assert cli.main(["sync", odd.url, "--name", "odd", "--label-tag", "StudyDescription", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err and says in err, err
    finally:
        odd.close()
    assert conn.execute("SELECT count(*) FROM medsim.datasets").fetchone() == (0,)


def test_an_empty_list_is_still_an_empty_pacs(conn, monkeypatch):
    monkeypatch.setenv("MEDSIM_PATIENT_KEY", KEY)
    odd = OddPacs([])
    try:
        assert pacs.sync(conn, odd.url, "odd", label_tag="StudyDescription", workers=1).listed == 0
    finally:
        odd.close()


def test_a_url_without_dicom_web_that_answers_400_says_what_to_try(conn, monkeypatch, capsys):
    monkeypatch.setenv("MEDSIM_PATIENT_KEY", KEY)
    odd = OddPacs(None, status=400, prefix="")
    try:
        assert cli.main(["sync", odd.url, "--name", "odd", "--label-tag", "StudyDescription", "--quiet"]) == 2
    finally:
        odd.close()
    err = capsys.readouterr().err
    assert (f"the PACS at {odd.url} answered 400 to a QIDO-RS query while searching instances; is the URL the "
            f"DICOMweb root (often ending in /dicom-web)?") in err and err.count("\n") == 1, err


# ---------------------------------------------------------------- the bomb in a real PACS
needs_orthanc = pytest.mark.skipif(not (orthanc.binary() and orthanc.dicomweb_plugin()),
                                   reason="Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)")


@needs_orthanc
def test_a_million_frame_instance_in_the_pacs_is_refused_unfetched_and_settled(conn, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSIM_PATIENT_KEY", KEY)
    monkeypatch.setenv("MEDSIM_PACS_USER", orthanc.USER)
    monkeypatch.setenv("MEDSIM_PACS_PASSWORD", orthanc.PASSWORD)
    o = orthanc.Orthanc(tmp_path / "orthanc").start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            o.upload(dicom_file(MILLION))
            fine = orthanc.instance((np.arange(32 * 32) % 200).astype(np.uint8).reshape(32, 32), "P-fine",
                                    "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2", "bomb", 1)
            o.upload(fine)
        t0 = time.monotonic()
        first = pacs.sync(conn, o.url, "pacs", label_tag="StudyDescription", workers=1)
        assert time.monotonic() - t0 < 30
        assert first.listed == 2 and first.archive.added == 1 and first.unsettled == 0
        (path, kind, why), = [tuple(p) for p in first.archive.problems if p.kind == "skipped"]
        assert why == "it claims 1,000,000 frames, over the limit of 10,000 for one file: refused before reading them"
        settled = conn.execute("SELECT outcome, reason FROM medsim.pacs_instances WHERE outcome = 'refused'").fetchall()
        assert settled == [("refused", why)]
        again = pacs.sync(conn, o.url, "pacs", label_tag="StudyDescription", workers=1, full=True)
        assert again.known == 2 and again.archive is None  # settled: not looked at again
    finally:
        o.stop()
