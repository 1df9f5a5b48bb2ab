"""Why two images are close: a similarity map for each image of a (query, neighbour) pair,
and a measure of whether a map is faithful.

A map says, pixel by pixel, how much of the pair's closeness that pixel of one image holds,
the other image fixed: f(x) = -distance(embed(x), embed(other)), attributed to x's pixels.
What a map measures is that, nothing more: "these pixels of this image, were they grey,
would move the pair apart", not a diagnosis' reason. Three attribution methods, all
captum's (the PyTorch field's attribution library; none hand-written):

- occlusion: a grey square slid over the image, the distance re-measured at each place
  (model-agnostic; cost: one forward pass per place);
- integrated_gradients: gradients of f integrated from a baseline to the image
  (Sundararajan et al. 2017), so the map sums to f(image) - f(baseline);
- gradient: gradient x input of f (the cheapest; saliency for embedding networks in the
  spirit of Stylianou et al. 2019).

A removed pixel becomes its blurred value by default ("blur": the detail is removed, not
a grey hole the network never saw in training), or mid-grey. Faithfulness is measured as
RISE's deletion curve (Petsiuk et al. 2018) on the pair distance: the most relevant
pixels are removed first, and the closeness left, (d_all - d_k) / (d_all - d_0), is
averaged over the steps (d_all: every pixel removed). A faithful map drives it
to 0 fast (a low AUC); a random order is the baseline. bench/bench_explain.py measures
it; docs/results.md has the table and the default chosen from it.
"""

from __future__ import annotations

import numpy as np
import torch

from medsim.model import network

METHODS = ("occlusion", "integrated_gradients", "gradient")
# chosen by bench/bench_explain.py (docs/results.md): integrated gradients from the blurred
# image had the lowest deletion AUC on every subset, under half of a random order's
DEFAULT = "integrated_gradients"
DEFAULT_BASELINE = "blur"
BASELINE = 0.0  # mid-grey in the network's [-1, 1] input scale
BASELINES = ("grey", "blur")


def baseline_of(x: torch.Tensor, kind: str) -> torch.Tensor:
    """What a removed pixel becomes: mid-grey, or the image blurred (a 7 px box: the
    pixel's neighbourhood without its detail, closer to what the network was trained on
    than a grey hole)."""
    if kind == "grey":
        return torch.full_like(x, BASELINE)
    if kind == "blur":
        k = max(3, (x.shape[-1] // 4) | 1)
        return torch.nn.functional.avg_pool2d(x, k, stride=1, padding=k // 2, count_include_pad=False)
    raise ValueError(f"unknown baseline {kind!r}; choose from {', '.join(BASELINES)}")


def _closeness(net, other: torch.Tensor):
    """f(x) = -distance(embed(x), embed(other)): larger when x is closer to other."""
    with torch.no_grad():
        z_other = net(other)

    def f(x: torch.Tensor) -> torch.Tensor:
        return -network.pair_distance(net(x), z_other.expand(len(x), -1))

    return f


def method_for(net, method: str) -> str:
    """The method a network allows: an imported encoder runs in ONNX Runtime, which has no
    gradients, so its maps are occlusion's whatever was asked (and the answer says so)."""
    return method if getattr(net, "differentiable", True) else "occlusion"


def attribute(net, x: torch.Tensor, other: torch.Tensor, method: str = DEFAULT,
              baseline: str = DEFAULT_BASELINE) -> np.ndarray:
    """x, other: (1, 3, S, S) model inputs -> (S, S) relevance of x's pixels for the pair's
    closeness (channels summed; positive: the pixel keeps the pair close)."""
    from captum.attr import InputXGradient, IntegratedGradients, Occlusion

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    method = method_for(net, method)
    net.eval()
    f = _closeness(net, other)
    x = x.detach().clone()
    s = x.shape[-1]
    base = baseline_of(x, baseline)
    if method == "occlusion":
        w = max(2, s // 7)  # 4 px squares at 28 px, moved by half a square
        a = Occlusion(f).attribute(x, sliding_window_shapes=(3, w, w), strides=(3, max(1, w // 2), max(1, w // 2)),
                                   baselines=base, perturbations_per_eval=64)
    elif method == "integrated_gradients":
        a = IntegratedGradients(f).attribute(x.requires_grad_(), baselines=base, n_steps=32,
                                             internal_batch_size=64)
    else:
        a = InputXGradient(f).attribute(x.requires_grad_()) if baseline == "grey" else (
            InputXGradient(f).attribute((x - base).requires_grad_()))
    return a.detach()[0].sum(0).numpy().astype(np.float32)


def pair_maps(net, a: np.ndarray, b: np.ndarray, method: str = DEFAULT,
              baseline: str = DEFAULT_BASELINE) -> tuple[np.ndarray, np.ndarray]:
    """Model inputs (S, S, 3) uint8 of the query and the neighbour -> their two (S, S) maps."""
    xa, xb = network.to_input(a[None]), network.to_input(b[None])
    return attribute(net, xa, xb, method, baseline), attribute(net, xb, xa, method, baseline)


def display(m: np.ndarray) -> np.ndarray:
    """A map -> [0, 1] for an overlay: its positive part (what keeps the pair close),
    scaled by its own 99th percentile so one hot pixel does not wash out the rest."""
    pos = np.clip(m, 0, None)
    top = np.percentile(pos, 99)
    return np.clip(pos / top, 0, 1) if top > 0 else np.zeros_like(pos)


@torch.no_grad()
def deletion_auc(net, x: torch.Tensor, other: torch.Tensor, order: np.ndarray, steps: int = 16,
                 baseline: str = DEFAULT_BASELINE) -> float:
    """RISE's deletion metric on the pair distance: x's pixels turned grey in `order` (flat
    indices, most relevant first), `steps` equal parts -> the mean closeness left, in
    [0, 1] (0: the first part alone undoes the closeness; lower is more faithful)."""
    s = x.shape[-1]
    z_other = net(other)
    batch = x.repeat(steps + 1, 1, 1, 1)
    base = baseline_of(x, baseline)[0]
    per = int(np.ceil(s * s / steps))
    for k in range(1, steps + 1):
        idx = order[: min(k * per, s * s)]
        rows, cols = np.unravel_index(idx, (s, s))
        batch[k:, :, rows, cols] = base[:, rows, cols]
    d = network.pair_distance(net(batch), z_other.expand(steps + 1, -1)).numpy()
    d0, d_grey = d[0], d[-1]
    if d_grey - d0 <= 1e-6:  # turning the whole image grey does not move the pair apart
        return float("nan")
    closeness = np.clip((d_grey - d) / (d_grey - d0), 0, 1)
    return float(np.trapezoid(closeness, dx=1 / steps))


def orders(m: np.ndarray | None, x: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Flat pixel orders for the deletion curve: a map's (most relevant first), random, or
    the plain-image baselines (brightest first; strongest edges first)."""
    if kind == "map":
        return np.argsort(-m, axis=None, kind="stable")
    if kind == "random":
        return rng.permutation(m.size if m is not None else x.shape[0] * x.shape[1])
    grey = x.astype(np.float32).mean(-1) if x.ndim == 3 else x.astype(np.float32)
    if kind == "intensity":
        return np.argsort(-grey, axis=None, kind="stable")
    if kind == "edges":
        gy, gx = np.gradient(grey)
        return np.argsort(-np.hypot(gx, gy), axis=None, kind="stable")
    raise ValueError(kind)


def faithfulness(net, a: np.ndarray, b: np.ndarray, ma: np.ndarray, mb: np.ndarray, seed: int = 0) -> dict:
    """The cheap check at run time (two deletion curves per image, one batch each): each
    map's deletion AUC against a random order's, and whether it passes the bar the
    default was chosen by (at most half the random order's). None where removing every
    pixel does not move the pair apart (nothing to measure)."""
    rng = np.random.default_rng(seed)
    xa, xb = network.to_input(a[None]), network.to_input(b[None])
    out = {}
    for name, x, other, m, img in (("query", xa, xb, ma, a), ("neighbour", xb, xa, mb, b)):
        auc = deletion_auc(net, x, other, orders(m, img, "map", rng))
        rand = deletion_auc(net, x, other, orders(m, img, "random", rng))
        ok = None if not (np.isfinite(auc) and np.isfinite(rand)) else bool(auc <= 0.5 * rand)
        out[name] = {"deletion_auc": None if not np.isfinite(auc) else round(auc, 4),
                     "random_auc": None if not np.isfinite(rand) else round(rand, 4), "faithful": ok}
    return out
