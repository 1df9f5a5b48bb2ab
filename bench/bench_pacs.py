"""PACS sync against ingest-folder, on the same DICOM files.

Starts a local Orthanc (Debian's orthanc + orthanc-dicomweb) with authentication on, makes
--n synthetic instances (256 x 256, 16-bit, --patients patients, two studies each, one
series per study), uploads them to Orthanc and writes the same files to a folder. Then, as
a user runs them (a fresh embedded database, Python start-up included):
- `medsim sync URL` into an empty database: instances/s and the peak RSS of its largest process;
- `medsim ingest-folder` of the same files into another dataset of the same database;
- `medsim sync` again with nothing new (goal: <= 2 s).
Goals on 2 cores: >= 200 instances/s, within 3x of ingest-folder.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
from common import machine  # noqa: E402

from tests import orthanc  # noqa: E402  (the test suite's Orthanc launcher and instance maker)

LABELS = ("normal", "benign", "malignant")


def pixels(rng, size: int = 256) -> np.ndarray:
    """A smooth random 12-bit image in a 16-bit container (every one distinct)."""
    coarse = rng.normal(0, 1, (size // 16, size // 16))
    x = np.kron(coarse, np.ones((16, 16))) + rng.normal(0, 0.2, (size, size))
    x = (x - x.min()) / (x.max() - x.min()) * 4095
    return x.astype(np.uint16)


def make(o, folder: Path, n: int, patients: int, seed: int = 0) -> float:
    from pydicom.uid import generate_uid

    rng = np.random.default_rng(seed)
    studies = [(f"BENCH{p:03d}", generate_uid(), generate_uid(), LABELS[p % 3]) for p in range(patients)
               for _ in range(2)]
    jobs = []
    for i in range(n):
        pid, study, series, label = studies[i % len(studies)]
        jobs.append((orthanc.instance(pixels(rng), pid, study, series, label, i), label, i))
    t0 = time.perf_counter()

    def put(job):
        data, label, i = job
        d = folder / label
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:06d}.dcm").write_bytes(data)
        o.upload(data)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(put, jobs))
    return time.perf_counter() - t0


def timed(args, env) -> tuple[float, str, float, float]:
    """-> (wall seconds, stdout, peak RSS MiB of the command's own process, of its largest
    worker process), sampled every 20 ms with psutil."""
    import psutil

    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "medsim.cli", *args], env=env, cwd=env["MEDSIM_HOME"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    main, kids, me = 0, {}, psutil.Process(p.pid)
    while p.poll() is None:
        try:
            main = max(main, me.memory_info().rss)
            for c in me.children(recursive=True):
                kids[c.pid] = max(kids.get(c.pid, 0), c.memory_info().rss)
        except psutil.Error:
            pass
        time.sleep(0.02)
    out = p.stdout.read()
    if p.returncode:
        raise SystemExit(f"medsim {' '.join(args)} failed ({p.returncode})")
    return time.perf_counter() - t0, out, main / 2**20, max(kids.values(), default=0) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000, help="instances")
    ap.add_argument("--patients", type=int, default=50)
    a = ap.parse_args()
    if orthanc.binary() is None or orthanc.dicomweb_plugin() is None:
        sys.exit("Orthanc is not installed: apt-get install orthanc orthanc-dicomweb")
    work = Path(tempfile.mkdtemp(prefix="medsim-bench-pacs-"))
    o = orthanc.Orthanc(work / "orthanc").start()
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL" and not k.startswith("PG")}
    env.update(MEDSIM_HOME=str(work), MEDSIM_PACS_USER=orthanc.USER, MEDSIM_PACS_PASSWORD=orthanc.PASSWORD)
    env.setdefault("MEDSIM_PATIENT_KEY", "bench key, long enough, throw-away")
    print(f"machine: {machine()}")
    try:
        made = make(o, work / "files", a.n, a.patients)
        print(f"made {a.n} instances (256 x 256, 16-bit, {a.patients} patients) and uploaded them to Orthanc "
              f"{o.url} in {made:.1f}s; Orthanc holds {o.count()}")
        timed(["migrate"], env)
        sync = [*("sync", o.url, "--name", "pacs", "--label-tag", "StudyDescription", "--quiet")]
        sync_s, out, rss, rss_worker = timed(sync, env)
        print(out.strip().splitlines()[0])
        folder_s, out, *_ = timed(["ingest-folder", str(work / "files"), "--name", "folder", "--max-side", "256",
                                   "--quiet"], env)
        print(out.strip().splitlines()[0])
        again_s, out, *_ = timed(sync, env)
        print(out.strip().splitlines()[0])
    finally:
        o.stop()
        subprocess.run([sys.executable, "-m", "medsim.cli", "db", "stop"], env=env, cwd=work, capture_output=True)
    print(f"SYNC   medsim sync (empty database): {a.n} instances in {sync_s:.2f}s wall = {a.n / sync_s:,.0f} "
          f"instances/s (goal >= 200); peak RSS {rss:,.0f} MiB (the sync), {rss_worker:,.0f} MiB (its largest "
          f"worker)")
    print(f"FOLDER medsim ingest-folder, the same files: {a.n} in {folder_s:.2f}s wall = {a.n / folder_s:,.0f} "
          f"files/s")
    print(f"RATIO  sync / ingest-folder time = {sync_s / folder_s:.2f}x (goal: within 3x)")
    print(f"AGAIN  medsim sync with nothing new: {again_s:.2f}s wall, Python start-up included (goal <= 2 s)")


if __name__ == "__main__":
    main()
