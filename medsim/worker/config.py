"""How a worker runs: its settings, and the command-line flags that set them (shared by
`python -m medsim.embed_worker` and `medsim worker`)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from medsim.errors import BadArgument

DESCRIPTION = ("Embedding worker: claims images pending for a model (FOR UPDATE SKIP LOCKED), embeds them and "
               "writes the vectors back, one transaction per batch. Run as many as you like, on one machine "
               "or many.")


@dataclass
class WorkerConfig:
    model: str = "current"  # model id, or "current": the current model, then the candidates
    promote_when_ready: bool = False  # make a candidate current once its gallery is complete
    batch_size: int = 256
    once: bool = False  # drain and exit
    poll_interval: float = 5.0  # seconds between polls when LISTEN hears nothing
    max_attempts: int = 3  # a bad image is retried this many times, then failed
    retry_delay_s: float = 10.0  # first retry delay; doubles with each attempt
    db_retries: int = 5  # reconnect attempts (exponential backoff) before giving up
    throttle_s: float = 0.0  # pause before each commit (load shaping; tests use it)
    # A lock wait longer than this rolls the batch back and tries again: the worker stays
    # responsive to SIGTERM, and says what it waits for, instead of hanging in libpq.
    lock_timeout_s: float = 5.0
    build_index: bool = True  # build the model's HNSW index once nothing is pending
    # A backlog this large (and at least policy.BULK_SHARE of what the model will hold) is
    # loaded with the model's HNSW index dropped, and the index is rebuilt after the drain
    # (pgvector's advice). A trickle keeps using the index. 0 disables.
    bulk_threshold: int = 10_000
    # torch intra-op threads; None: the cores shared among the medsim workers running on
    # this host (counted in pg_stat_activity), re-counted as workers come and go
    threads: int | None = None
    # a second connection, so one batch is claimed, decoded and written while the other is
    # embedded. None: on for a GPU, off on the CPU, where the claim and torch compete for
    # the same cores (2 cores, 100k images: 24.3 s with it, 18.5 s without; two workers
    # beat both, 15.7 s)
    prefetch: bool | None = None
    device: str = "cpu"
    runtime: str | None = None  # None: $MEDSIM_RUNTIME, else onnx (medsim.model.runtime)
    database_url: str | None = None
    progress: bool = True

    def __post_init__(self):
        # a batch size of 0 would claim nothing and report the queue drained
        for name in ("batch_size", "max_attempts"):
            if getattr(self, name) < 1:
                raise BadArgument(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("poll_interval", "retry_delay_s", "lock_timeout_s"):
            if not getattr(self, name) > 0:
                raise BadArgument(f"{name} must be positive, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise BadArgument(f"threads must be at least 1, got {self.threads}")
        for name in ("db_retries", "throttle_s", "bulk_threshold"):
            if getattr(self, name) < 0:
                raise BadArgument(f"{name} must not be negative, got {getattr(self, name)}")

    @property
    def lanes(self) -> int:
        """Batch transactions in flight at once (2 with prefetch)."""
        prefetch = self.prefetch if self.prefetch is not None else str(self.device).startswith("cuda")
        return 2 if prefetch else 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="current",
                   help="model id, or 'current' (default): the current model's backlog, then each candidate's")
    p.add_argument("--promote-when-ready", action="store_true",
                   help="make a candidate current as soon as its whole gallery is embedded (medsim models promote)")
    p.add_argument("--batch-size", type=int, default=256, help="images claimed per transaction")
    p.add_argument("--once", action="store_true", help="drain the pending work, then exit 0")
    p.add_argument("--poll-interval", type=float, default=5.0, help="seconds between polls when idle")
    p.add_argument("--max-attempts", type=int, default=3, help="tries per image before it is marked failed")
    p.add_argument("--db-retries", type=int, default=5, help="reconnect attempts before exiting with an error")
    p.add_argument("--throttle", type=float, default=0.0,
                   help="seconds to pause before each batch commits (load shaping)")
    p.add_argument("--lock-timeout", type=float, default=5.0,
                   help="seconds to wait for a lock before rolling the batch back and retrying (default 5)")
    p.add_argument("--no-index", action="store_true", help="do not build the HNSW index after draining")
    p.add_argument("--bulk-threshold", type=int, default=10_000,
                   help="a backlog at least this large (and a quarter of the model's images) is loaded with the "
                        "model's HNSW index dropped and rebuilt after (default 10000; 0: never drop it)")
    p.add_argument("--prefetch", action=argparse.BooleanOptionalAction, default=None,
                   help="claim the next batch on a second connection while this one is embedded (default: on "
                        "for cuda, off on the CPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: $OMP_NUM_THREADS, else this host's cores divided among the "
                        "medsim workers running on it)")
    p.add_argument("--device", default="cpu", help="torch device for inference (cpu, cuda)")
    p.add_argument("--runtime", choices=("onnx", "torch"), default=None,
                   help="what runs the network on the CPU (default: $MEDSIM_RUNTIME, else onnx where its "
                        "embeddings match torch's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def from_args(a: argparse.Namespace) -> WorkerConfig:
    return WorkerConfig(model=a.model, promote_when_ready=a.promote_when_ready, batch_size=a.batch_size, once=a.once, poll_interval=a.poll_interval,
                        max_attempts=a.max_attempts, db_retries=a.db_retries, throttle_s=a.throttle,
                        lock_timeout_s=a.lock_timeout, bulk_threshold=a.bulk_threshold, threads=a.threads,
                        prefetch=a.prefetch, build_index=not a.no_index, device=a.device, runtime=a.runtime,
                        database_url=a.database_url, progress=not a.quiet)
