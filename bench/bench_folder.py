"""Folder ingest against .npz ingest, on the same real pixels.

Writes --n PNG files (default 20,000) in the ImageFolder layout from the MedMNIST images
in ../shared/medmnist (each copy flipped or shifted by a seeded amount, so every file is
distinct and keeps its label), then times `medsim ingest-folder` on them as a user runs
it (a fresh embedded database, Python start-up included), beside `medsim ingest` of the
three .npz files. Prints images/s for both and their ratio (goal: folder within 3x).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PRESENT, SHARED, machine  # noqa: E402


def write_pngs(out: Path, n: int, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    pool = []
    for flag in PRESENT:
        with np.load(SHARED / f"{flag}.npz") as z:
            for split in ("train", "val", "test"):
                x, y = z[f"{split}_images"], z[f"{split}_labels"][:, 0]
                pool += [(flag, int(lab), img) for img, lab in zip(x, y, strict=True)]
    t0 = time.perf_counter()
    for i in range(n):
        flag, lab, img = pool[i % len(pool)]
        if i >= len(pool):  # later copies: a seeded flip and shift, so the pixels differ
            img = np.roll(img[:, ::-1] if rng.random() < 0.5 else img, int(rng.integers(1, 4)), axis=1)
        d = out / f"{flag}-{lab}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:06d}.png")
    return time.perf_counter() - t0


def timed(args, env) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "medsim.cli", *args], env=env, check=True, cwd=env["MEDSIM_HOME"],
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000, help="PNG files to write and ingest")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="medsim-bench-folder-"))
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL" and not k.startswith("PG")}
    env["MEDSIM_HOME"] = str(work)
    env.setdefault("MEDSIM_PATIENT_KEY", "bench key, long enough, throw-away")  # paths are stored keyed
    print(f"machine: {machine()}")
    write_s = write_pngs(work / "pngs", a.n)
    print(f"wrote {a.n} PNG files in {write_s:.1f}s")
    try:
        timed(["migrate"], env)
        npz_s = timed(["ingest", *PRESENT, "--data-dir", str(SHARED), "--accept-unofficial", "--quiet"], env)
        n_npz = 780 + 1600 + 5856
        folder_s = timed(["ingest-folder", str(work / "pngs"), "--name", "pngs", "--quiet"], env)
    finally:
        subprocess.run([sys.executable, "-m", "medsim.cli", "db", "stop"], env=env, cwd=work, capture_output=True)
    npz_rate, folder_rate = n_npz / npz_s, a.n / folder_s
    print(f"NPZ    medsim ingest (3 subsets): {n_npz} images in {npz_s:.2f}s wall = {npz_rate:,.0f} images/s")
    print(f"FOLDER medsim ingest-folder: {a.n} PNG files in {folder_s:.2f}s wall = {folder_rate:,.0f} images/s")
    print(f"RATIO  npz / folder = {npz_rate / folder_rate:.1f}x (goal: within 3x)")


if __name__ == "__main__":
    main()
