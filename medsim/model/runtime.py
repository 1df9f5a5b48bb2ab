"""The network at inference: torch eager, or the same graph exported to ONNX Runtime.

Training, evaluation and explanations use the torch module; the worker and the service
embed through a Runtime. ONNX Runtime's CPU execution provider runs the default 28 px
network with flip TTA 2.5-3x faster than torch eager (bench/bench_worker.py --forward,
docs/results.md), mostly because eager torch pays a per-operator dispatch that dominates
at these sizes. It is the default only where it agrees with torch: every prepare() embeds
a fixed probe batch both ways and falls back to torch, with a log line, if any embedding
differs by more than PARITY_COSINE.

The exporter is torch's TorchScript-based one (dynamo=False): the network is a plain
feed-forward graph, and the dynamo exporter would add onnxscript as a dependency for no
gain here. An export that passed the parity check is kept under MEDSIM_HOME/onnx, named
by the checkpoint's sha256 (keep()): a later process opens it with ONNX Runtime alone, so
a one-image search from the shell (`medsim search --image-file`) never imports torch,
whose import alone costs 2-3 s (for_query()).
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from pathlib import Path

import numpy as np

from medsim.errors import BadArgument
from medsim.model.sessions import as_nchw3, cpu_session, probe_images  # noqa: F401  (runtime.probe_images: tests, benches)

log = logging.getLogger("medsim.runtime")

RUNTIMES = ("onnx", "torch")
PARITY_COSINE = 1e-3  # largest 1 - cosine(torch, onnx) over the probe batch that is accepted
# ONNX Runtime wants larger batches than torch eager: on 2 cores, the default net ran
# 4.5-5.5k images/s at 256 and 6.0-6.7k at 1024 (torch: 1.4-2.2k at its own best, 64); the
# 128 px seed net 0.3k at 4, 0.6-0.8k at 64-128. So 16x torch's rule (ModelConfig.inference_batch).
ONNX_BATCH_FACTOR = 16


class TorchRuntime:
    name = "torch"

    def __init__(self, net, device="cpu"):
        self.net, self.cfg, self.device = net, net.cfg, device
        self.batch = net.cfg.inference_batch(device)

    def set_threads(self, n: int) -> None:
        import torch

        if torch.get_num_threads() != n:  # OpenMP's count belongs to the calling thread
            torch.set_num_threads(n)

    def embed(self, images: np.ndarray) -> np.ndarray:
        from medsim.model import network

        return network.embed(self.net, images, batch_size=self.batch, device=self.device)


class OnnxRuntime:
    name = "onnx"

    def __init__(self, net, threads: int = 1):
        self.net = net  # the torch module stays: explanations need its gradients
        self.cfg = net.cfg
        self.batch = net.cfg.inference_batch("cpu") * ONNX_BATCH_FACTOR
        self.model = export(net)
        self.threads = None
        self.set_threads(threads)

    def set_threads(self, n: int) -> None:
        """A session's intra-op pool is fixed when it is made: a new count, a new session
        (a few milliseconds from the bytes in memory)."""
        if n == self.threads:
            return
        self.session = cpu_session(self.model, n)
        self.threads = n

    def embed(self, images: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(images), self.batch):
            out.append(self.session.run(None, {"x": onnx_input(images[i:i + self.batch])})[0])
        return np.concatenate(out) if out else np.zeros((0, self.cfg.embedding_dim), np.float32)


class StoredOnnxRuntime(OnnxRuntime):
    """An export kept on disk, opened without torch. ``load_net``: how to get the torch
    module if someone asks for it (an explanation needs its gradients)."""

    def __init__(self, path: Path, cfg, load_net, threads: int = 1):
        self.cfg, self._load_net, self._net = cfg, load_net, None
        self.batch = cfg.inference_batch("cpu") * ONNX_BATCH_FACTOR
        self.model = str(path)
        self.threads = None
        self.set_threads(threads)

    @property
    def net(self):
        if self._net is None:
            self._net = self._load_net()
        return self._net


def onnx_input(images: np.ndarray) -> np.ndarray:
    """network.to_input without torch: uint8 (N, H, W) or (N, H, W, C in {1, 3}) -> float32
    (N, 3, H, W) in [-1, 1], the same float32 operations (x / 127.5 - 1), so the same bits."""
    x = np.ascontiguousarray(as_nchw3(images), np.float32)
    x /= np.float32(127.5)
    x -= np.float32(1.0)
    return x


def export_path(checkpoint_sha256: str) -> Path:
    from medsim import settings

    return settings.get().home / "onnx" / f"{checkpoint_sha256}.onnx"


def keep(rt, checkpoint_sha256: str) -> None:
    """Write an ONNX Runtime's export (one that passed the parity check) where for_query()
    finds it, once per checkpoint: under a temporary name, then renamed, so a reader never
    opens half a file. A home that cannot be written only costs later searches the torch
    import."""
    if not isinstance(rt, OnnxRuntime) or isinstance(rt, StoredOnnxRuntime):
        return
    path = export_path(checkpoint_sha256)
    if path.exists():
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(rt.model)
        os.replace(tmp, path)
    except OSError as err:
        log.warning("could not keep the ONNX export at %s (%s); searches by file will import torch", path, err)


def for_query(cfg, checkpoint_sha256: str, load_net, threads: int = 1, load_checkpoint=None):
    """The runtime for a process that embeds a few images and exits (the CLI): the kept
    export through ONNX Runtime, no torch import; else the torch network, exported and
    checked once (prepare) and kept for the next process. MEDSIM_RUNTIME=torch: torch.
    An imported encoder is ONNX already: its stored bytes, no torch (load_checkpoint)."""
    from medsim import settings

    if cfg.arch == "onnx" and load_checkpoint is not None:
        from medsim.model import imported

        return imported.load(bytes(load_checkpoint()), cfg, checkpoint_sha256, threads)
    path = export_path(checkpoint_sha256)
    if settings.get().runtime == "onnx" and path.exists():
        try:
            return StoredOnnxRuntime(path, cfg, load_net, threads)
        except Exception as err:  # a damaged file: torch still works, and writes it again
            log.warning("the kept ONNX export %s cannot be opened (%s); embedding with torch", path, err)
            path.unlink(missing_ok=True)
    rt = prepare(load_net(), threads=threads)
    keep(rt, checkpoint_sha256)
    return rt


def export(net) -> bytes:
    """The eval-mode network (flip TTA and normalisation included) -> ONNX bytes with a
    variable batch size."""
    import torch

    s = net.cfg.image_size
    buf = io.BytesIO()
    was_training = net.training
    net.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer warnings
            torch.onnx.export(net, (torch.zeros(2, 3, s, s),), buf, dynamo=False, input_names=["x"],
                              output_names=["z"], dynamic_axes={"x": {0: "n"}, "z": {0: "n"}},
                              opset_version=17)
    finally:
        net.train(was_training)
    return buf.getvalue()


def max_cosine_gap(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    cos = (a * b).sum(1) / np.maximum(na * nb, 1e-12)
    return float((1 - cos).max())


def prepare(net, runtime: str | None = None, threads: int = 1, device="cpu"):
    """The torch network -> the Runtime that embeds with it: ONNX Runtime by default on
    the CPU, torch on a GPU, on request, or where the two disagree on the probe batch."""
    from medsim import settings

    runtime = runtime or settings.get().runtime
    if runtime not in RUNTIMES:
        raise BadArgument(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
    if net.cfg.arch == "onnx":  # an imported encoder: ONNX Runtime on the CPU is all it has
        net.rt.set_threads(threads)
        return net.rt
    torch_rt = TorchRuntime(net, device)
    if runtime == "torch" or not str(device).startswith("cpu"):
        torch_rt.set_threads(threads)
        return torch_rt
    try:
        onnx_rt = OnnxRuntime(net, threads)
    except Exception as err:  # an operator the exporter or the runtime lacks: torch still works
        log.warning("ONNX export failed (%s: %s); embedding with torch", type(err).__name__, err)
        return torch_rt
    probe = probe_images(net.cfg.image_size)
    gap = max_cosine_gap(torch_rt.embed(probe), onnx_rt.embed(probe))
    if gap > PARITY_COSINE:
        log.warning("ONNX Runtime's embeddings differ from torch's (1 - cosine up to %.1e > %.0e); embedding "
                    "with torch", gap, PARITY_COSINE)
        return torch_rt
    return onnx_rt
