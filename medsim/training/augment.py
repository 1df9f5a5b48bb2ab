"""Training-time augmentation, on whole batches (float tensors in [-1, 1], (B, 3, S, S)).

One random affine map per image (rotation, scale, shift, horizontal flip) through
`affine_grid`/`grid_sample`, then brightness and contrast jitter. Vectorised, so it
costs a small fraction of a training step at 28 px. The ranges are what all four
MedMNIST modalities tolerate: an X-ray, an ultrasound, a fundus photo or a skin lesion
shifted by two pixels, turned by ten degrees or mirrored keeps its diagnosis.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

KINDS = ("none", "flip", "affine")


def augment(x: torch.Tensor, kind: str, gen: torch.Generator, degrees: float = 10.0,
            scale: float = 0.1, shift_px: float = 2.0, jitter: float = 0.1) -> torch.Tensor:
    if kind == "none":
        return x
    n = len(x)
    flip = torch.rand(n, generator=gen) < 0.5
    if kind == "flip":
        x = x.clone()
        x[flip] = x[flip].flip(-1)
        return x
    if kind != "affine":
        raise ValueError(f"augment must be one of {KINDS}, got {kind!r}")
    u = lambda: torch.rand(n, generator=gen) * 2 - 1  # noqa: E731  uniform in [-1, 1)
    angle = u() * math.radians(degrees)
    s = 1 + u() * scale
    # affine_grid works in normalised coordinates: [-1, 1] spans the image
    shift = shift_px * 2 / x.shape[-1]
    tx, ty = u() * shift, u() * shift
    sign = torch.where(flip, -1.0, 1.0)
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.stack([torch.stack([cos * sign, -sin, tx], 1), torch.stack([sin * sign, cos, ty], 1)], 1)
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    contrast = (1 + u() * jitter).view(n, 1, 1, 1).to(x.device, x.dtype)
    brightness = (u() * jitter).view(n, 1, 1, 1).to(x.device, x.dtype)
    return (x * contrast + brightness).clamp_(-1, 1)
