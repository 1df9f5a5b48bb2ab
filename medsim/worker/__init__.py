"""The embedding worker: `python -m medsim.embed_worker`, or `medsim worker`.

- config.py: WorkerConfig and its command-line flags
- batch.py: one batch, one transaction (claim -> decode -> embed -> COPY -> dequeue)
- lanes.py: batches in flight (one lane, or two with --prefetch)
- policy.py: torch threads, the bulk-load index drop, what happens after a drain
- loop.py: connect, load the model, drain, wait for work, reconnect
- main.py: the command

The names below load on first use: `medsim status` builds its parser from config.py
without paying for the loop's imports.
"""

import importlib

# (not `main`: a function named like its submodule would be shadowed by the submodule
# once imported; the command is medsim.worker.main.main)
_EXPORTS = {"WorkerConfig": "config", "Worker": "loop", "Summary": "summary"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"medsim.worker.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'medsim.worker' has no attribute {name!r}")
