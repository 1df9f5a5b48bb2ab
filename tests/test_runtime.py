"""The exported network agrees with torch's, and only an agreeing export is used."""

import logging

import numpy as np
import pytest
import torch

from medsim.errors import BadArgument
from medsim.model import network, runtime
from medsim.model.config import preset
from medsim.search import recall
from tests import synth


def _images(n: int, size: int, seed: int = 0, labels: bool = False):
    """Synthetic retina-like colour images with a class blob (not noise: neighbours mean
    something), plus noise-level differences so no two are the same."""
    a = synth.make_arrays("retinamnist", seed=seed, size=size, n_samples={"train": n, "val": 1, "test": 1})
    return (a["train_images"], a["train_labels"][:, 0].astype(np.int64)) if labels else a["train_images"]


def _recall_at_10(zt_q, zt_b, zo_q, zo_b) -> float:
    """The exported model's top 10 (searching its own gallery) against torch's exact top 10,
    tie-aware as `medsim recall` is: an untrained network puts many images at equal distances."""
    # distances as differences in float64: the float32 |q|^2 - 2qb + |b|^2 expansion alone
    # reorders neighbours that are 1e-3 apart
    io = np.argsort(np.linalg.norm(zo_q[:, None].astype(np.float64) - zo_b[None], axis=2), axis=1)[:, :10]
    d_gt = np.sort(np.linalg.norm(zt_q[:, None].astype(np.float64) - zt_b[None], axis=2), axis=1)
    return recall.tie_aware_recall(zt_q, io, d_gt, np.arange(len(zt_b)), zt_b, 10)


def _trained(cfg, steps: int = 15):
    """A few steps of real training: weights and BatchNorm statistics moved, embeddings
    spread out (an untrained network puts every image within 1e-4 of the others, where a
    neighbour order means nothing)."""
    torch.manual_seed(1)
    net = network.EmbeddingNet(cfg)
    imgs, labels = _images(128, cfg.image_size, seed=3, labels=True)
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    key = torch.as_tensor(labels)
    for _ in range(steps):
        net.train()
        z = torch.cat(net.parts(network.to_input(imgs)), 1)
        loss = network.batch_contrastive_loss(z, key, torch.zeros_like(key), 1.0, 1.4)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


@pytest.mark.parametrize("cfg", [preset("default", widths=(8, 16, 32)), preset("default", tta_flip=False),
                                 preset("default", members=2, widths=(8, 16, 32)), preset("seed", image_size=64)],
                         ids=["default", "no-tta", "members", "seed-arch"])
def test_onnx_embeddings_and_neighbours_match_torch(cfg):
    net = _trained(cfg)
    rt = runtime.prepare(net, "onnx")
    assert rt.name == "onnx"
    gallery, queries = _images(600, cfg.image_size, 1), _images(100, cfg.image_size, 2)
    zt_b, zo_b = network.embed(net, gallery), rt.embed(gallery)
    zt_q, zo_q = network.embed(net, queries), rt.embed(queries)
    assert zo_b.dtype == np.float32 and zo_b.shape == zt_b.shape
    assert runtime.max_cosine_gap(zt_b, zo_b) < 1e-3 and runtime.max_cosine_gap(zt_q, zo_q) < 1e-3
    assert _recall_at_10(zt_q, zt_b, zo_q, zo_b) >= 0.99
    # grey (N, H, W) inputs take the same path as torch's
    grey = gallery[:8, :, :, 0]
    assert runtime.max_cosine_gap(network.embed(net, grey), rt.embed(grey)) < 1e-3
    assert rt.embed(gallery[:0]).shape == (0, cfg.embedding_dim)


def test_an_export_that_disagrees_is_not_used(monkeypatch, caplog):
    net = network.EmbeddingNet(preset("default")).eval()
    real = runtime.OnnxRuntime.embed
    monkeypatch.setattr(runtime.OnnxRuntime, "embed", lambda self, x: real(self, x)[:, ::-1].copy())
    with caplog.at_level(logging.WARNING, "medsim.runtime"):
        rt = runtime.prepare(net, "onnx")
    assert rt.name == "torch"
    assert "differ from torch's" in caplog.text


def test_an_export_that_fails_falls_back_to_torch(monkeypatch, caplog):
    net = network.EmbeddingNet(preset("default")).eval()

    def broken(_net):
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(runtime, "export", broken)
    with caplog.at_level(logging.WARNING, "medsim.runtime"):
        assert runtime.prepare(net, "onnx").name == "torch"
    assert "unsupported operator" in caplog.text


def test_runtime_choice_threads_and_bad_names(monkeypatch):
    net = network.EmbeddingNet(preset("default")).eval()
    assert runtime.prepare(net, "torch").name == "torch"
    monkeypatch.setenv("MEDSIM_RUNTIME", "torch")
    assert runtime.prepare(net).name == "torch"  # the setting
    monkeypatch.setenv("MEDSIM_RUNTIME", "tensorrt")
    with pytest.raises(BadArgument, match="unknown runtime 'tensorrt'; choose from onnx, torch"):
        runtime.prepare(net)
    rt = runtime.prepare(net, "onnx", threads=2)
    first = rt.session
    rt.set_threads(2)
    assert rt.session is first  # same count: the session is kept
    rt.set_threads(1)
    assert rt.session is not first and rt.session.get_session_options().intra_op_num_threads == 1
    # the network is left as it was found (the export switches it to eval and back)
    net.train()
    runtime.export(net)
    assert net.training


def test_the_onnx_input_is_torchs_input_bit_for_bit():
    rng = np.random.default_rng(3)
    for shape in ((5, 28, 28), (5, 28, 28, 1), (5, 32, 32, 3)):
        x = rng.integers(0, 256, shape, dtype=np.uint8)
        assert np.array_equal(runtime.onnx_input(x), network.to_input(x).numpy())


def test_a_kept_export_is_used_without_torch_and_a_damaged_one_is_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSIM_HOME", str(tmp_path))
    net = network.EmbeddingNet(preset("default"))
    loads = []

    def load_net():
        loads.append(1)
        return net

    x = np.random.default_rng(1).integers(0, 256, (8, 28, 28), dtype=np.uint8)
    first = runtime.for_query(net.cfg, "ab" * 32, load_net)
    assert isinstance(first, runtime.OnnxRuntime) and loads == [1]  # nothing kept: the network, checked, kept
    assert runtime.export_path("ab" * 32).read_bytes() == first.model
    again = runtime.for_query(net.cfg, "ab" * 32, load_net)
    assert isinstance(again, runtime.StoredOnnxRuntime) and loads == [1]  # the network is not loaded
    assert np.allclose(again.embed(x), first.embed(x), atol=1e-6)
    assert again.net is net and loads == [1, 1]  # only when asked for (an explanation)
    runtime.export_path("ab" * 32).write_bytes(b"not onnx")
    third = runtime.for_query(net.cfg, "ab" * 32, load_net)
    assert not isinstance(third, runtime.StoredOnnxRuntime)
    assert runtime.export_path("ab" * 32).read_bytes() == third.model
