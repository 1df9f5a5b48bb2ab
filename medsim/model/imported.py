"""An encoder a hospital already trusts: a frozen ONNX model, imported (`medsim models import`).

A foundation model's ONNX export, validated elsewhere, embeds the archive as it is: the
workers run it through ONNX Runtime (no torch), and search, evaluation, calibration,
recall, explanations (by occlusion: ONNX Runtime gives no gradients) and `models compare`
treat it as any model, because ModelRow.load() wraps it as a torch module
(network.ImportedNet) where one is expected.

Before it is stored, the file is opened and run on a probe batch, and refused in a
sentence where medsim could not use it: not a model ONNX Runtime opens, an input that is
not one (batch, channels, height, width) float tensor of the size asked, outputs that are
not one vector per image, NaNs, the same vector for different images, more dimensions
than pgvector can index (halfvec's 4,000; above vector's 2,000 the per-model HNSW index
is built on halfvec, search/pgvector_hnsw.py), a file over PostgreSQL's 1 GB value.

What is stored (the registry's checkpoint bytes) is a NumPy .npz container, data only
(np.load with allow_pickle=False): the ONNX file's bytes under "onnx" and, for a model
`medsim train --on` made, its contrastive head (head_w1, head_b1, head_w2, head_b2).
Embeddings are the encoder's output L2-normalised (cosine neighbours, the usual kNN on
frozen features, Denner et al. 2024), then, if there is one, through the head.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from medsim.errors import BadArgument, DataRefused
from medsim.model import sessions
from medsim.model.config import MAX_INPUT, MIN_INPUT, ModelConfig

# the file is stored in PostgreSQL as one bytea value, which holds at most 1 GB
MAX_BYTES = 2**30 - 2**20
# pgvector's HNSW index: vector up to 2,000 dimensions, halfvec up to 4,000
VECTOR_INDEX_MAX, HALFVEC_INDEX_MAX = 2000, 4000
HEAD_KEYS = ("head_w1", "head_b1", "head_w2", "head_b2")
PROBE_N = 4


def read_file(path: str | Path) -> bytes:
    """The file's bytes, or one sentence on why not (a FIFO or a folder is not a file; the
    size is checked before anything is read, and the read is bounded in case it grows)."""
    p = Path(path)
    if not p.exists():
        # exists() is False for a link to nothing and for a loop of links, not only a missing name
        raise BadArgument(f"{path}: a symbolic link to nothing (or a loop of links)" if p.is_symlink()
                          else f"{path}: no such file")
    if not p.is_file():
        raise BadArgument(f"{path}: not a regular file (an ONNX model is one file)")
    try:
        size = p.stat().st_size
        if size == 0:
            raise DataRefused(f"{path} is empty: not an ONNX model")
        if size > MAX_BYTES:
            raise DataRefused(f"{path} is {size / 2**30:.2f} GB: an encoder is stored in PostgreSQL as one "
                              f"value, which holds at most 1 GB")
        with open(p, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as err:  # permission denied, removed between the checks and the read, I/O error
        raise BadArgument(f"{path}: cannot be read ({err.strerror or type(err).__name__})") from None
    if len(data) > MAX_BYTES:
        raise DataRefused(f"{path} grew past 1 GB while it was read")
    return data


def _session(onnx_bytes: bytes, threads: int = 1):
    if _external_data(onnx_bytes):
        raise DataRefused("the file keeps its weights in another file (ONNX external data), which medsim does not "
                          "store: save it as one file (onnx.save_model(model, path, save_as_external_data=False))")
    try:
        return sessions.cpu_session(onnx_bytes, threads)
    except Exception as err:  # ONNX Runtime's InvalidProtobuf, Fail, NotImplemented...
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise DataRefused(f"not an ONNX model ONNX Runtime can open ({first})") from None


def _external_data(onnx_bytes: bytes) -> bool:
    """Whether any tensor's data is in another file: only the file's bytes are stored, so
    such a model opens nowhere (ONNX Runtime would look for that file beside the current
    directory, and say so in a paragraph). The key "location" is in every such file, so
    the protobuf is parsed only where the bytes hold it."""
    if b"location" not in onnx_bytes:
        return False
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    try:
        model = onnx.load_model_from_string(onnx_bytes)  # never reads external data
    except Exception:  # not a protobuf: ONNX Runtime says so
        return False
    return any(uses_external_data(t) for t in _get_all_tensors(model))


def _fixed(d) -> bool:
    return isinstance(d, int) and d > 0


def _per_channel(values, channels: int, what: str) -> tuple[float, ...]:
    v = tuple(float(x) for x in values)
    if all(np.isfinite(v)) and max(map(abs, v)) > float(np.finfo(np.float32).max):  # in float32
        raise BadArgument(f"--{what} must be within float32's range, got {v}")
    if len(v) == 1:
        v = v * channels
    if len(v) != channels:
        raise BadArgument(f"--{what} takes 1 or {channels} numbers (one per channel), got {len(v)}")
    if not all(np.isfinite(v)) or (what == "std" and min(v) <= 0):
        raise BadArgument(f"--{what} must be finite{' and above 0' if what == 'std' else ''}, got {v}")
    return v


def inspect(onnx_bytes: bytes, *, input_size: int | None = None, channels: int | None = None,
            mean=None, std=None) -> ModelConfig:
    """Open the file, check its input, run it on a probe batch -> the model's config (its
    embedding_dim the output's length). Every refusal is one sentence."""
    sess = _session(onnx_bytes)
    ins = sess.get_inputs()
    if len(ins) != 1:
        raise DataRefused(f"the model takes {len(ins)} inputs ({', '.join(i.name for i in ins)}); "
                          f"an image encoder takes one")
    inp = ins[0]
    if inp.type != "tensor(float)":
        raise DataRefused(f"the model's input is {inp.type}; medsim feeds float32 images (tensor(float))")
    if len(inp.shape) != 4:
        raise DataRefused(f"the model's input has rank {len(inp.shape)} ({inp.shape}); an image encoder "
                          f"takes (batch, channels, height, width)")
    _, c, h, w = inp.shape
    if _fixed(c) and c not in (1, 3):
        raise DataRefused(f"the model's input takes {c} channels; medsim gives 1 (grey) or 3 (RGB)")
    if channels is not None and _fixed(c) and c != channels:
        raise BadArgument(f"the model's input takes {c} channel(s), not --channels {channels}")
    ch = channels or (c if _fixed(c) else 3)
    if _fixed(h) and _fixed(w) and h != w:
        raise DataRefused(f"the model's input is {h} x {w} pixels; medsim's model inputs are square")
    if input_size is None:
        if not (_fixed(h) or _fixed(w)):
            raise BadArgument("the model's input size is not fixed in the file: give --input-size N")
        input_size = h if _fixed(h) else w
    elif (_fixed(h) and h != input_size) or (_fixed(w) and w != input_size):
        raise DataRefused(f"the model takes {h} x {w} pixels, not --input-size {input_size}")
    if not MIN_INPUT <= input_size <= MAX_INPUT:
        raise BadArgument(f"--input-size must be {MIN_INPUT}-{MAX_INPUT} pixels, got {input_size}")
    defaults = ModelConfig()
    cfg = ModelConfig(preset="onnx", arch="onnx", image_size=int(input_size), embedding_dim=0, widths=(),
                      normalize=True, channels=ch,
                      mean=_per_channel(defaults.mean[:ch] if mean is None else mean, ch, "mean"),
                      std=_per_channel(defaults.std[:ch] if std is None else std, ch, "std"))
    probe = to_unit(sessions.probe_images(cfg.image_size, PROBE_N))
    raw = _run(sess, inp, _normalise(probe, cfg))
    if raw.shape[0] != PROBE_N or sum(d != 1 for d in raw.shape[1:]) > 1:
        raise DataRefused(f"the model's output for {PROBE_N} images has shape {tuple(raw.shape)}: medsim needs one "
                          f"vector per image (export the pooled output, e.g. the CLS token)")
    z = raw.reshape(PROBE_N, -1)
    if not np.isfinite(z).all():
        raise DataRefused("the model's output has NaN or infinite values on a probe batch of ordinary images")
    dim = z.shape[1]
    if dim < 2:  # L2-normalised, one number is only its sign: a score, not an embedding
        raise DataRefused("the model gives one number per image: medsim needs an embedding (a vector)")
    if dim > HALFVEC_INDEX_MAX:
        raise DataRefused(f"the model's output has {dim} dimensions; pgvector indexes at most {VECTOR_INDEX_MAX} "
                          f"(vector) or {HALFVEC_INDEX_MAX} (halfvec): export a smaller projection")
    if np.ptp(z, axis=0).max() <= 1e-6 * max(1.0, float(np.abs(z).max())):
        raise DataRefused("the model gives the same vector for different images: it cannot tell them apart")
    return replace(cfg, embedding_dim=dim)


def _run(sess, inp, x: np.ndarray) -> np.ndarray:
    """Run a session on (N, C, S, S) float32; an input with a fixed batch size gets chunks
    of that size, the last padded."""
    b = inp.shape[0]
    if not _fixed(b):
        return np.asarray(sess.run(None, {inp.name: x})[0])
    out = []
    for i in range(0, len(x), b):
        chunk = x[i:i + b]
        pad = b - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
        out.append(np.asarray(sess.run(None, {inp.name: chunk})[0])[:b - pad])
    return np.concatenate(out)


def to_unit(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W) or (N, H, W, C in {1, 3}) -> float32 (N, 3, H, W) in [0, 1]."""
    return np.ascontiguousarray(sessions.as_nchw3(images), np.float32) / np.float32(255)


def _normalise(x01: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """(N, 3, S, S) in [0, 1] -> what the encoder takes: 1 channel (ITU-R 601 luma; a grey
    image's own value) or 3, each (x - mean) / std."""
    if cfg.channels == 1:
        x01 = np.tensordot(np.float32([0.299, 0.587, 0.114]), x01, axes=([0], [1]))[:, None].astype(np.float32)
    mean = np.float32(cfg.mean).reshape(1, -1, 1, 1)
    std = np.float32(cfg.std).reshape(1, -1, 1, 1)
    return np.ascontiguousarray((x01 - mean) / std, np.float32)


def _l2(z: np.ndarray) -> np.ndarray:
    return (z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def apply_head(f: np.ndarray, head: dict) -> np.ndarray:
    """The contrastive head (training/head.py) on L2-normalised features, in NumPy."""
    h = np.maximum(f @ head["head_w1"] + head["head_b1"], 0)
    return _l2(h @ head["head_w2"] + head["head_b2"])


class ImportedRuntime:
    """The imported encoder at inference: ONNX Runtime on the CPU, no torch."""

    name = "onnx (imported)"

    def __init__(self, onnx_bytes: bytes, cfg: ModelConfig, threads: int = 1, head: dict | None = None):
        self.onnx, self.cfg, self.head = onnx_bytes, cfg, head
        self.batch = cfg.inference_batch("cpu")
        self.threads = None
        self.set_threads(threads)

    def set_threads(self, n: int) -> None:
        if n != self.threads:
            self.session = _session(self.onnx, n)
            self.input = self.session.get_inputs()[0]
            self.threads = n

    def features(self, x01: np.ndarray) -> np.ndarray:
        """(N, 3, S, S) float32 in [0, 1] -> the encoder's L2-normalised output (no head)."""
        out = [_run(self.session, self.input, _normalise(x01[i:i + self.batch], self.cfg)).reshape(
            len(x01[i:i + self.batch]), -1) for i in range(0, len(x01), self.batch)]
        return _l2(np.concatenate(out)) if out else np.zeros((0, self.feature_dim), np.float32)

    @property
    def feature_dim(self) -> int:
        return int(self.head["head_w1"].shape[0]) if self.head else self.cfg.embedding_dim

    def embed_unit(self, x01: np.ndarray) -> np.ndarray:
        f = self.features(x01)
        return apply_head(f, self.head) if self.head else f

    def embed(self, images: np.ndarray) -> np.ndarray:
        return self.embed_unit(to_unit(images))

    @property
    def net(self):
        """A torch module over this runtime, where one is expected (explanations)."""
        from medsim.model import network

        return network.ImportedNet(self)


def pack(onnx_bytes: bytes, head: dict | None = None) -> tuple[bytes, str]:
    """-> (the registry's checkpoint bytes, their sha256)."""
    buf = io.BytesIO()
    arrays = {"onnx": np.frombuffer(onnx_bytes, np.uint8)}
    for k in HEAD_KEYS if head else ():
        arrays[k] = np.asarray(head[k], np.float32)
    np.savez(buf, **arrays)
    data = buf.getvalue()
    return data, hashlib.sha256(data).hexdigest()


def unpack(data: bytes, expected_sha256: str | None = None) -> tuple[bytes, dict | None]:
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise DataRefused("checkpoint sha256 does not match the registry; refusing to load it")
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        head = {k: z[k] for k in HEAD_KEYS} if HEAD_KEYS[0] in z.files else None
        return z["onnx"].tobytes(), head


def load(data: bytes, cfg: ModelConfig, expected_sha256: str | None = None, threads: int = 1) -> ImportedRuntime:
    onnx_bytes, head = unpack(data, expected_sha256)
    return ImportedRuntime(onnx_bytes, cfg, threads=threads, head=head)


def describe(cfg: ModelConfig) -> str:
    index = "vector" if cfg.embedding_dim <= VECTOR_INDEX_MAX else "halfvec"
    return (f"{cfg.image_size} x {cfg.image_size} px, {cfg.channels} channel(s), mean {list(cfg.mean)}, "
            f"std {list(cfg.std)}, {cfg.embedding_dim}-d output ({index} HNSW index)")


def file_name(path) -> str:
    return os.path.basename(str(path))
