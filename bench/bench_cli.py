"""Start-up cost of the `medsim` commands, measured as a new user runs them.

A throw-away MEDSIM_HOME with the embedded server (DATABASE_URL unset, the README's
setup), the three offline MedMNIST subsets, a model (one short epoch: the weights do not
matter here), every image embedded and one FAISS flat index. Then each command runs
--runs times as its own process (`python -m medsim.cli ...`, Python start-up included);
the script prints the median wall time, the peak RSS of the process (ru_maxrss from
wait4) and whether torch or FAISS got imported.

Only the CLI is driven, so the same script measures an older checkout too:
    PYTHONPATH=/path/to/old/checkout python bench/bench_cli.py
Goal (issue 9): search by id through pgvector under 0.5 s wall and 150 MB peak RSS.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "medmnist"

# (label, arguments); {img} is a test image written by the set-up
COMMANDS = [
    ("search by id (pgvector)", ["search", "--image-id", "3000", "-k", "4"]),
    ("search by id (faiss)", ["search", "--image-id", "3000", "-k", "4", "--engine", "faiss"]),
    ("search by file (pgvector)", ["search", "--image-file", "{img}", "-k", "4"]),
    ("status", ["status"]),
    ("models", ["models"]),
    ("db status", ["db", "status"]),
    ("index list", ["index", "list"]),
]

# reports which heavy modules a command imported, printed by a wrapper around cli.main
WRAPPER = ("import sys, runpy; sys.argv = ['medsim'] + sys.argv[1:]\n"
           "try:\n    runpy.run_module('medsim.cli', run_name='__main__')\n"
           "finally:\n    print('IMPORTED', ','.join(m for m in ('torch', 'faiss') if m in sys.modules),"
           " file=sys.stderr)\n")


def run(args: list[str], env: dict, measure: bool = False) -> tuple[float, int, str, int]:
    """-> (wall s, peak RSS KiB, heavy modules imported, exit code)."""
    cmd = [sys.executable, "-c", WRAPPER, *args] if measure else [sys.executable, "-m", "medsim.cli", *args]
    t0 = time.perf_counter()
    # cwd: the throw-away home, so `python -c`/`-m` import medsim as installed, never a
    # checkout that happens to be the current directory
    p = subprocess.Popen(cmd, env=env, cwd=env["MEDSIM_HOME"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    err = p.stderr.read()
    p.stderr.close()
    code = os.waitstatus_to_exitcode(status)
    imported = next((line.split(" ", 1)[1] for line in err.splitlines() if line.startswith("IMPORTED")), "?")
    if code != 0 and not measure:
        sys.exit(f"set-up step {' '.join(args)} failed ({code}):\n{err}")
    return wall, usage.ru_maxrss, imported.strip() or "neither", code


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="runs per command (median reported)")
    ap.add_argument("--data-dir", default=str(SHARED), help="MedMNIST .npz directory")
    a = ap.parse_args()

    home = Path(tempfile.mkdtemp(prefix="medsim-bench-cli-"))
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL" and not k.startswith("PG")}
    env["MEDSIM_HOME"] = str(home)
    out = home / "out"
    where = subprocess.run([sys.executable, "-c", "import medsim; print(medsim.__file__)"], cwd=home,
                           capture_output=True, text=True).stdout.strip()
    print(f"set-up in {home}; medsim from {where}")
    try:
        run(["db", "start"], env)
        run(["migrate"], env)
        run(["ingest", "breastmnist", "retinamnist", "pneumoniamnist", "--data-dir", a.data_dir,
             "--accept-unofficial", "--quiet"], env)
        run(["train", "--epochs", "1", "--pairs-per-epoch", "512", "--quiet", "--out-dir", str(out)], env)
        subprocess.run([sys.executable, "-m", "medsim.embed_worker", "--once", "--quiet"], env=env,
                       cwd=home, check=True, capture_output=True)
        run(["index", "build", "--kind", "flat", "--out-dir", str(out)], env)
        img = home / "query.png"
        from PIL import Image  # a 28 px grey image, the size of the stored ones

        Image.new("L", (28, 28), 128).save(img)

        print(f"{'command':28s} {'median s':>9s} {'min s':>7s} {'peak RSS MB':>12s}  imports")
        for label, args in COMMANDS:
            args = [x.format(img=img) for x in args]
            res = [run(args, env, measure=True) for _ in range(a.runs)]
            if res[0][3] != 0:
                print(f"{label:28s} (not available in this version: exit {res[0][3]})")
                continue
            walls = [r[0] for r in res]
            print(f"{label:28s} {statistics.median(walls):9.2f} {min(walls):7.2f} "
                  f"{max(r[1] for r in res) / 1024:12.0f}  {res[0][2]}")
    finally:
        subprocess.run([sys.executable, "-m", "medsim.cli", "db", "stop"], env=env, cwd=home, capture_output=True)


if __name__ == "__main__":
    main()
