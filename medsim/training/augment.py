"""Training-time augmentation, on whole batches (float tensors in [-1, 1], (B, 3, S, S)).

"affine": one random affine map per image (rotation, scale, shift, horizontal flip)
through `affine_grid`/`grid_sample`, then brightness and contrast jitter. Vectorised, so
it costs a small fraction of a training step at 28 px. The ranges are what all four
MedMNIST modalities tolerate: an X-ray, an ultrasound, a fundus photo or a skin lesion
shifted by two pixels, turned by ten degrees or mirrored keeps its diagnosis.

"any_size" (issue 39): the affine map plus a mild crop (BreastMNIST is a ~85% centre crop
of its BUSI frame), then most images as if they had arrived at another size: resampled
to 0.5x-4x with a random filter (nearest, bilinear, bicubic, area; stored as 8 bits), some
JPEG-like blocking at that size, and back to the training size the way the one resize
path does it (medsim.images.convert.resize: Lanczos, antialiased when shrinking; here its
nearest torch relative, antialiased bicubic), rounded to 8 bits as model_input rounds,
then a mild blur on some. A query never comes at the stored size (a PACS original, a
screenshot, an export shrunk for email); a network trained on one resampling only found a
2x bilinear copy of a training image first 0% of the time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

KINDS = ("none", "flip", "affine", "any_size")
FILTERS = ("nearest", "bilinear", "bicubic", "area")
# arrival scales, a geometric grid (one interpolate call per scale and filter, not per image)
SCALES = (0.5, 0.63, 0.79, 1.26, 1.59, 2.0, 2.52, 3.17, 4.0)
MAX_SIDE = 448  # an arrival larger than this is taken at this size: up-then-down converges by 4x
# JPEG's luminance quantisation table (ITU T.81, Annex K), scaled by quality as libjpeg does
_JPEG_Q = torch.tensor([
    [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55], [14, 13, 16, 24, 40, 57, 69, 56],
    [14, 17, 22, 29, 51, 87, 80, 62], [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]], dtype=torch.float32)


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
    if kind not in ("affine", "any_size"):
        raise ValueError(f"augment must be one of {KINDS}, got {kind!r}")
    if kind == "affine":
        return _affine(x, flip, gen, degrees, scale, shift_px, jitter)
    # dozens of small ops per batch (one resample per scale and filter): on one thread, not
    # OpenMP's two, as each op's thread hand-off cost more than the op (a 144-image 28 px
    # batch on a busy 2-core machine: 920 ms on two threads, 22 ms on one); per-element ops,
    # so the result does not depend on the thread count
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return any_size(_affine(x, flip, gen, degrees, scale, shift_px, jitter, crop=0.18), gen)
    finally:
        torch.set_num_threads(threads)


def _affine(x, flip, gen, degrees, scale, shift_px, jitter, crop: float = 0.0) -> torch.Tensor:
    n = len(x)
    u = lambda: torch.rand(n, generator=gen) * 2 - 1  # noqa: E731  uniform in [-1, 1)
    angle = u() * math.radians(degrees)
    s = 1 + u() * scale
    # affine_grid works in normalised coordinates: [-1, 1] spans the image
    shift = shift_px * 2 / x.shape[-1]
    tx, ty = u() * shift, u() * shift
    sign = torch.where(flip, -1.0, 1.0)
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    if crop:  # half the images: a square crop of side 1 - crop..1, anywhere inside, filling the frame
        side = torch.where(torch.rand(n, generator=gen) < 0.5, 1 - torch.rand(n, generator=gen) * crop, 1.0)
        cos, sin = cos * side, sin * side
        tx, ty = tx + u() * (1 - side), ty + u() * (1 - side)
    theta = torch.stack([torch.stack([cos * sign, -sin, tx], 1), torch.stack([sin * sign, cos, ty], 1)], 1)
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    contrast = (1 + u() * jitter).view(n, 1, 1, 1).to(x.device, x.dtype)
    brightness = (u() * jitter).view(n, 1, 1, 1).to(x.device, x.dtype)
    return (x * contrast + brightness).clamp_(-1, 1)


def any_size(x: torch.Tensor, gen: torch.Generator, p_resize: float = 0.8, p_jpeg: float = 0.3,
             p_blur: float = 0.2, max_sigma: float = 0.8) -> torch.Tensor:
    """(B, C, S, S) in [-1, 1] -> the same shape: each image as if it had arrived at another
    size (p_resize), JPEG-blocked there (p_jpeg), and back at S; then a blur (p_blur)."""
    n, size = len(x), x.shape[-1]
    resize = torch.rand(n, generator=gen) < p_resize
    which_scale = torch.randint(len(SCALES), (n,), generator=gen)
    which_filter = torch.randint(len(FILTERS), (n,), generator=gen)
    jpeg = torch.rand(n, generator=gen) < p_jpeg
    quality = 50 + torch.rand(n, generator=gen) * 45  # q = 50..95
    blur = torch.rand(n, generator=gen) < p_blur
    sigma = 0.3 + torch.rand(n, generator=gen) * (max_sigma - 0.3)
    out = x.clone()
    for i, sc in enumerate(SCALES):
        side = max(2, min(MAX_SIDE, round(size * sc)))
        for j, name in enumerate(FILTERS):
            m = resize & (which_scale == i) & (which_filter == j)
            if not m.any():
                continue
            idx = m.nonzero().squeeze(1).to(x.device)
            y = _quantise(_resample(x[idx], side, name))  # the copy as saved: 8 bits at its size
            if jpeg[m].any():
                jm = jpeg[m].to(x.device)
                y[jm] = jpeg_like(y[jm], quality[m][jpeg[m]])
            out[idx] = _resample(y, size, "back")
    out = torch.where(blur.to(x.device).view(-1, 1, 1, 1), gaussian_blur(out, sigma), out)
    return _quantise(out)


def _resample(x: torch.Tensor, side: int, name: str) -> torch.Tensor:
    # Pillow's bilinear and bicubic widen their kernel when shrinking (antialiased); nearest
    # does not; area is a box average (Pillow's BOX, OpenCV's INTER_AREA). "back" is the
    # one resize path's Lanczos, approximated by antialiased bicubic.
    if name == "nearest":
        return F.interpolate(x, size=(side, side), mode="nearest-exact")
    if name == "area":
        return F.interpolate(x, size=(side, side), mode="area")
    mode = "bilinear" if name == "bilinear" else "bicubic"
    return F.interpolate(x, size=(side, side), mode=mode, antialias=True, align_corners=False).clamp_(-1, 1)


def _quantise(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats rounded to the 256 levels of an 8-bit image."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round_().div_(127.5).sub_(1)


def jpeg_like(x: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> the same, each channel through 8x8 block DCT quantisation
    with JPEG's luminance table at a per-image quality (no chroma subsampling, no entropy
    coding: those change bytes, not pixels). Edge blocks are padded by replication."""
    b, c, h, w = x.shape
    ph, pw = -h % 8, -w % 8
    y = F.pad(x, (0, pw, 0, ph), mode="replicate") * 127.5  # level-shifted to -128..127 as JPEG does
    H, W = h + ph, w + pw
    blocks = y.reshape(b, c, H // 8, 8, W // 8, 8).transpose(3, 4)  # (b, c, bh, bw, 8, 8)
    d = _dct8(x.device, x.dtype)
    q = quality.to(x.device, x.dtype)
    scale = torch.where(q < 50, 5000 / q, 200 - 2 * q) / 100  # libjpeg's quality scaling
    table = (_JPEG_Q.to(x.device, x.dtype) * scale.view(-1, 1, 1)).clamp(min=1).view(b, 1, 1, 1, 8, 8)
    coef = d @ blocks @ d.T
    blocks = d.T @ ((coef / table).round() * table) @ d
    y = blocks.transpose(3, 4).reshape(b, c, H, W)[..., :h, :w] / 127.5
    return y.clamp(-1, 1)


def _dct8(device, dtype) -> torch.Tensor:
    k = torch.arange(8, dtype=torch.float64)
    d = torch.cos((2 * k[None, :] + 1) * k[:, None] * math.pi / 16) * math.sqrt(2 / 8)
    d[0] /= math.sqrt(2)
    return d.to(device, dtype)  # orthonormal: d @ d.T = I


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W), per-image sigma (px) -> blurred, separable, border replicated."""
    b, c, h, w = x.shape
    r = 2
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-(t[None, :] ** 2) / (2 * sigma.to(x.device, x.dtype)[:, None] ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (b * c, 2r + 1)
    y = F.pad(x.reshape(1, b * c, h, w), (r, r, r, r), mode="replicate")
    y = F.conv2d(y, k.view(b * c, 1, 1, -1), groups=b * c)
    y = F.conv2d(y, k.view(b * c, 1, -1, 1), groups=b * c)
    return y.view(b, c, h, w)
