"""The embedding worker: `python -m medsim.embed_worker`, or `medsim worker`.

- config.py: WorkerConfig and its command-line flags
- batch.py: one batch, one transaction (claim -> decode -> embed -> COPY -> dequeue)
- lanes.py: batches in flight (one lane, or two with --prefetch)
- policy.py: torch threads, the bulk-load index drop, what happens after a drain
- loop.py: connect, load the model, drain, wait for work, reconnect
- main.py: the command
"""

from medsim.worker.config import WorkerConfig
from medsim.worker.loop import Worker
from medsim.worker.main import main
from medsim.worker.summary import Summary

__all__ = ["Summary", "Worker", "WorkerConfig", "main"]
