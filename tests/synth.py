"""Small synthetic MedMNIST-shaped .npz files with learnable structure.

Each class draws a bright blob at its own height; grey subsets and colour subsets
differ in channels and in tint, so both 'same dataset' and 'same label' are learnable.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medsim.sources import medmnist


def make_arrays(flag: str, seed: int = 0, size: int = 28, n_samples=None) -> dict[str, np.ndarray]:
    e = medmnist.entry(flag, size)
    rng = np.random.default_rng(seed)
    n_samples = n_samples or e.n_samples
    out = {}
    yy, xx = np.mgrid[0:size, 0:size]
    tint = np.array([1.0, 0.6, 0.3]) if sum(map(ord, flag)) % 2 else np.array([0.3, 0.6, 1.0])
    for split in medmnist.SPLITS:
        n = n_samples[split]
        if e.multi_label:
            labels = rng.integers(0, 2, size=(n, e.n_classes))
            cls = labels.argmax(1)
        else:
            labels = rng.integers(0, e.n_classes, size=(n, 1))
            cls = labels[:, 0]
        # the class sets the blob's height, on the vertical midline: a mirror image (the
        # training flips and the default model's flip test-time augmentation) keeps the class
        cy = size * (0.25 + 0.5 * cls / max(e.n_classes - 1, 1))
        cx = np.full(n, size / 2)
        blob = np.exp(-(((yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2) / 18.0))
        img = 0.15 + 0.7 * blob + rng.normal(0, 0.05, size=(n, size, size))
        img = np.clip(img, 0, 1)
        if e.n_channels == 3:
            img = img[..., None] * tint[None, None, None, :]
        out[f"{split}_images"] = (img * 255).astype(np.uint8)
        out[f"{split}_labels"] = labels.astype(np.uint8)
    return out


def write_npz(directory: Path, flag: str, seed: int = 0, size: int = 28, **overrides) -> Path:
    arrays = make_arrays(flag, seed, size)
    arrays.update(overrides)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    e = medmnist.entry(flag, size)
    path = Path(directory) / e.filename
    np.savez_compressed(path, **arrays)
    return path
