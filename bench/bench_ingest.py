"""Ingest breast, retina and pneumonia from ../shared/medmnist into a fresh database.

Prints, per subset and in total: file read+verify time, COPY (encode + send + commit)
time and images/s, and the whole command's wall time.
"""

from __future__ import annotations

import sys
import time

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from common import PRESENT, SHARED, fresh_database, machine  # noqa: E402

from medsim import db, ingest  # noqa: E402


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
    server.cleanup()


if __name__ == "__main__":
    main()
