"""Similarity maps (medsim.model.explain) where the answer is known, and the deletion
metric on cases where faithful and unfaithful orders are known."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from medsim.model import explain, network
from medsim.model.config import preset


class LeftHalf(nn.Module):
    """An embedding network that sees only the left half of its input."""

    def __init__(self, size: int = 28):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.head = nn.Linear(16 * 4, 8)
        self.size = size

    def forward(self, x):
        h = F.relu(self.conv(x[..., : self.size // 2]))
        h = F.adaptive_avg_pool2d(h, 2).flatten(1)
        return F.normalize(self.head(h), dim=1)


def _pair(size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-40, 40, a.shape), 0, 255).astype(np.uint8)
    return a, b


@pytest.mark.parametrize("method", explain.METHODS)
def test_a_network_that_looks_at_the_left_half_gets_maps_on_the_left_half(method):
    net = LeftHalf().eval()
    a, b = _pair(28)
    for m in explain.pair_maps(net, a, b, method):
        assert m.shape == (28, 28) and np.isfinite(m).all()
        mass = np.abs(m)
        assert mass[:, :14].sum() >= 0.9 * mass.sum(), (method, mass[:, :14].sum() / mass.sum())


@pytest.mark.parametrize("cfg", [preset("default", widths=(8, 16, 32)), preset("seed", image_size=64)],
                         ids=["default-28px", "seed-64px"])
def test_maps_for_the_project_networks_any_size(cfg):
    torch.manual_seed(0)
    net = network.EmbeddingNet(cfg).eval()
    s = cfg.image_size
    a, b = _pair(s, 1)
    grey = np.repeat(a[..., :1], 3, axis=2)  # a grey image, as 1-channel files are fed
    for method in explain.METHODS:
        ma, mb = explain.pair_maps(net, grey, b, method)
        assert ma.shape == mb.shape == (s, s) and np.isfinite(ma).all() and np.isfinite(mb).all()
        d = explain.display(ma)
        assert d.min() >= 0 and d.max() <= 1


def test_deletion_auc_rewards_the_relevant_pixels_first():
    """For the left-half network, deleting the left half first undoes the closeness within
    half the curve; deleting the right half first changes nothing until it is done."""
    net = LeftHalf().eval()
    a, b = _pair(28, 2)
    xa, xb = network.to_input(a[None]), network.to_input(b[None])
    cols = np.tile(np.arange(28), 28)
    left_first = np.argsort(cols >= 14, kind="stable")
    right_first = np.argsort(cols < 14, kind="stable")
    good = explain.deletion_auc(net, xa, xb, left_first)
    bad = explain.deletion_auc(net, xa, xb, right_first)
    assert 0 <= good < 0.5 < bad <= 1
    rng = np.random.default_rng(0)
    m = explain.attribute(net, xa, xb, "integrated_gradients")
    faithful = explain.deletion_auc(net, xa, xb, explain.orders(m, a, "map", rng))
    random = np.mean([explain.deletion_auc(net, xa, xb, explain.orders(m, a, "random", rng)) for _ in range(5)])
    assert faithful < random
    with pytest.raises(ValueError, match="unknown method"):
        explain.attribute(net, xa, xb, "lime")


def test_the_run_time_check_passes_a_faithful_map_and_fails_a_reversed_one():
    net = LeftHalf().eval()
    a, b = _pair(28, 3)
    ma, mb = explain.pair_maps(net, a, b)
    ok = explain.faithfulness(net, a, b, ma, mb)
    assert ok["query"]["faithful"] is True and ok["neighbour"]["faithful"] is True
    assert 0 <= ok["query"]["deletion_auc"] <= 0.5 * ok["query"]["random_auc"]
    right_first = np.tile(np.arange(28, dtype=np.float32), (28, 1))  # the half the network ignores, first
    bad = explain.faithfulness(net, a, b, right_first, right_first)
    assert bad["query"]["faithful"] is False and bad["neighbour"]["faithful"] is False
