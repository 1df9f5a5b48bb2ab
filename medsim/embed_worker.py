"""`python -m medsim.embed_worker`: the embedding worker (medsim.worker), under the name
compose files and scripts already use. `medsim worker` is the same command."""

import sys

from medsim.worker import Summary, Worker, WorkerConfig
from medsim.worker.main import main

__all__ = ["Summary", "Worker", "WorkerConfig", "main"]

if __name__ == "__main__":
    sys.exit(main())
