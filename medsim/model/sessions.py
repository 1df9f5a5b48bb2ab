"""What every ONNX Runtime session in medsim shares: how it is opened on the CPU, and the
probe batch a network is checked on (runtime.prepare's parity check; imported.inspect's
checks of a file before it is stored)."""

from __future__ import annotations

import numpy as np


def cpu_session(model, threads: int):
    """An ONNX Runtime session on the CPU for an ONNX model (bytes or a path), with this
    many intra-op threads and no inter-op pool (the graph is one chain)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.log_severity_level = 3  # warnings about unused initialisers are not the user's business
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def probe_images(size: int, n: int = 32) -> np.ndarray:
    """A fixed batch for the parity check: noise, ramps and flat images, grey and colour."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    x[: n // 4] = np.broadcast_to(ramp[None, None, :, None], (n // 4, size, size, 3)).astype(np.uint8)
    x[n // 4: n // 2] = x[n // 4: n // 2, :, :, :1]  # grey noise
    x[-1] = 128
    return x


def as_nchw3(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W) or (N, H, W, C in {1, 3}) -> a (N, 3, H, W) view, grey repeated to
    three channels: the layout every ONNX input starts from (runtime.onnx_input in [-1, 1],
    imported.to_unit in [0, 1])."""
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[..., None]
    if x.shape[-1] == 1:
        x = np.broadcast_to(x, (*x.shape[:-1], 3))
    if x.shape[-1] != 3:
        raise ValueError(f"expected 1 or 3 channels, got {x.shape[-1]}")
    return x.transpose(0, 3, 1, 2)
