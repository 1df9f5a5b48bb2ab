"""Ingest breast, retina and pneumonia from ../shared/medmnist into a fresh database.

Prints, per subset and in total: file read+verify time, COPY (encode + send + commit)
time and images/s, and the whole command's wall time.
"""

from __future__ import annotations

import sys
import time

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from common import PRESENT, SHARED, fresh_database, machine  # noqa: E402

from medsim import db  # noqa: E402
from medsim.sources import ingest  # noqa: E402


def main() -> None:
    url, server = fresh_database()
    print(f"machine: {machine()}")
    t0 = time.perf_counter()
    total = read = copy = 0.0
    n = 0
    with db.connect(url) as conn:
        for flag in PRESENT:
            r = ingest.ingest(conn, flag, data_dir=SHARED, accept_unofficial=True,
                              allow_download=False, show_progress=False)
            print(r.line())
            n += r.added
            read += r.read_s
            copy += r.copy_s
    total = time.perf_counter() - t0
    print(f"TOTAL {n} images: read+verify {read:.3f}s, COPY {copy:.3f}s "
          f"({n / copy:,.0f} images/s insert stage), whole command {total:.3f}s "
          f"({n / total:,.0f} images/s); database share of wall time {copy / total:.0%}")
    # the real command, as a user runs it, into a second fresh database
    import os
    import subprocess

    url2, server2 = fresh_database("bench_cli")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "medsim.cli", "ingest", *PRESENT, "--data-dir", str(SHARED),
                          "--accept-unofficial", "--quiet"], env={**os.environ, "DATABASE_URL": url2},
                         capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    copy_s = sum(float(line.split("COPY ")[1].split("s")[0]) for line in out.stdout.splitlines()
                 if "COPY " in line)
    print(f"CLI `medsim ingest {' '.join(PRESENT)}`: {wall:.2f}s wall (Python start-up and imports "
          f"included), of which COPY {copy_s:.2f}s ({copy_s / wall:.0%})")
    server.cleanup()
    server2.cleanup()


if __name__ == "__main__":
    main()
