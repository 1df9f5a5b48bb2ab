"""A real Orthanc (Debian's `orthanc` + `orthanc-dicomweb`) for the PACS tests: a free
loopback port, a temporary storage folder, a generated configuration with the DICOMweb
plugin and HTTP authentication on. Also DICOM instances made with pydicom from synthetic
pixels, and a small proxy in front of Orthanc that can fail on purpose."""

from __future__ import annotations

import http.server
import io
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import requests

USER, PASSWORD = "medsim", "a-pacs-password"
PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc")


def binary() -> str | None:
    return shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)


def dicomweb_plugin() -> str | None:
    for d in PLUGIN_DIRS:
        for p in sorted(Path(d).glob("libOrthancDicomWeb.so*")) if Path(d).is_dir() else ():
            return str(p)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    def __init__(self, folder: Path):
        self.folder = folder
        self.port = free_port()
        self.root = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.root}/dicom-web"
        self.proc: subprocess.Popen | None = None
        self.http = requests.Session()
        self.http.auth = (USER, PASSWORD)
        (folder / "storage").mkdir(parents=True, exist_ok=True)
        self.config = folder / "orthanc.json"
        self.config.write_text(json.dumps({
            "Name": "medsim-test", "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "storage"), "HttpPort": self.port, "DicomServerEnabled": False,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD},
            "Plugins": [dicomweb_plugin()], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "HttpCompressionEnabled": False, "StableAge": 1, "HttpThreadsCount": 8, "ConcurrentJobs": 1,
            "SaveJobs": False}))

    def start(self) -> Orthanc:
        with open(self.folder / "orthanc.log", "ab") as log:  # the child keeps its own copy
            self.proc = subprocess.Popen([binary(), str(self.config)], cwd=self.folder, stdout=subprocess.DEVNULL,
                                         stderr=log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if self.http.get(f"{self.root}/system", timeout=1).ok:
                    return self
            except requests.ConnectionError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {(self.folder / 'orthanc.log').read_text()[-2000:]}")
            time.sleep(0.1)
        raise RuntimeError("Orthanc did not start within 30 s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def upload(self, data: bytes) -> dict:
        r = self.http.post(f"{self.root}/instances", data=data, timeout=30)
        r.raise_for_status()
        return r.json()

    def delete_study(self, study_uid: str) -> None:
        found = self.http.post(f"{self.root}/tools/lookup", data=study_uid, timeout=10).json()
        for f in found:
            if f["Type"] == "Study":
                self.http.delete(f"{self.root}/studies/{f['ID']}", timeout=10).raise_for_status()

    def count(self) -> int:
        return self.http.get(f"{self.root}/statistics", timeout=10).json()["CountInstances"]


def instance(pixels: np.ndarray, patient: str, study: str, series: str, label: str, number: int,
             study_date: str = "20260101", name: str | None = None) -> bytes:
    """A Secondary Capture instance, 8- or 16-bit grey, as a DICOM file's bytes."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    sop = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, sop
    ds.PatientID, ds.PatientName = patient, name or f"Doe^{patient}"
    ds.PatientBirthDate = "19700101"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.StudyDate, ds.Modality, ds.StudyDescription = study_date, "OT", label
    ds.InstanceNumber = number
    ds.Rows, ds.Columns = pixels.shape[:2]
    bits = 16 if pixels.dtype == np.uint16 else 8
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit, ds.PixelRepresentation = bits - 1, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


class FaultyProxy:
    """Forwards to Orthanc, except what `fault(path)` says: None (forward), an HTTP status
    to answer, "garbage" (a 200 with a body that is not DICOM), or "slow" (answer late)."""

    def __init__(self, target: str):
        self.target = target
        self.fault = lambda path: None
        self.seen: list[str] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                proxy.seen.append(self.path)
                what = proxy.fault(self.path)
                if what == "slow":
                    time.sleep(3)
                if isinstance(what, int):
                    self.send_response(what)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                r = requests.get(proxy.target + self.path, auth=(USER, PASSWORD),
                                 headers={k: v for k, v in self.headers.items() if k.lower() in ("accept",)},
                                 timeout=30)
                body = r.content
                if what == "garbage":
                    boundary = "medsimtest"
                    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + os.urandom(300)
                            + f"\r\n--{boundary}--".encode())
                    ctype = f'multipart/related; type="application/dicom"; boundary={boundary}'
                else:
                    ctype = r.headers.get("Content-Type", "application/octet-stream")
                self.send_response(r.status_code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        class Quiet(http.server.ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass  # a client that gave up on a slow answer closed its socket: expected here

        self.server = Quiet(("127.0.0.1", 0), Handler)
        self.root = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.url = f"{self.root}/dicom-web"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
