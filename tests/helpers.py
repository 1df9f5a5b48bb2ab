"""Shared test helpers: ingested synthetic data and registered (untrained) models."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from medsim import registry
from medsim.model import config, network
from medsim.sources import ingest


def ingest_synth(conn, synth_dir, flags=("breastmnist", "retinamnist")) -> int:
    return sum(ingest.ingest(conn, f, data_dir=synth_dir, accept_unofficial=True,
                             show_progress=False).added for f in flags)


def register_model(conn, preset="default", current=True, seed=0, **overrides) -> int:
    """An untrained but deterministic model: enough to exercise every storage path."""
    torch.manual_seed(seed)
    net = network.EmbeddingNet(config.preset(preset, **overrides)).eval()
    mid = registry.register(conn, net, mode="label", datasets=["breastmnist", "retinamnist"],
                            train_config={"test": True})
    if current:
        registry.set_current(conn, mid)
    return mid


def worker_cmd(url, *args) -> list[str]:
    return [sys.executable, "-m", "medsim.embed_worker", "--database-url", url, "--quiet", *args]


def run_worker(url, *args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(worker_cmd(url, *args), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def start_worker(url, *args) -> subprocess.Popen:
    return subprocess.Popen(worker_cmd(url, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def embed_all(url: str) -> None:
    from medsim.worker import Worker, WorkerConfig

    Worker(WorkerConfig(once=True, database_url=url, progress=False)).run()


def search(conn, image_ids=(), image_files=(), dataset=None, filters=None, index_path=None, **options):
    """The search pipeline for a list of stored ids and files, as `medsim search` runs it
    -> [(query, hits)]; `dataset` adds that filter."""
    from medsim.search import pipeline
    from medsim.search.context import Context
    from medsim.search.request import ByFile, ById, Filters, Request

    f = filters or Filters()
    if dataset is not None:
        f = Filters({**f.where, "dataset": dataset}, f.include_own_patient, f.per_patient)
    if "model_ref" in options:
        options["model"] = options.pop("model_ref")
    ctx = Context(conn, index_path=index_path)
    results = [pipeline.run(ctx, Request(q, filters=f, **options))
               for q in [ById(i) for i in image_ids] + [ByFile(str(p)) for p in image_files]]
    return [(r.query, r.hits) for r in results]


def keyed(kind: str, value: str) -> str:
    """A value as the database stores it (patient, path or uid), with the test suite's key."""
    from medsim.sources import keys
    from tests.conftest import TEST_KEY

    return keys.Keyring((TEST_KEY,)).hash(kind, value)


def image_by_path(conn, rel: str, columns: str = "id"):
    """The row of the image ingested from this file (its path is stored keyed)."""
    return conn.execute(f"SELECT {columns} FROM medsim.images WHERE source_path = %s",  # columns: the test's own
                        (keyed("path", rel),)).fetchone()
