"""Shared test helpers: ingested synthetic data and registered (untrained) models."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from medsim import registry
from medsim.sources import ingest
from medsim.training import config, network


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
    from medsim.embed_worker import Worker, WorkerConfig

    Worker(WorkerConfig(once=True, database_url=url, progress=False)).run()
