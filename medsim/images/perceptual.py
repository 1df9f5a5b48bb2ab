"""A picture's identity at any size: a perceptual hash, and the grey image to confirm it by.

The sha256 of the stored pixels recognises only a byte-identical copy. pHash (the DCT of
the 32 x 32 grey image, the 8 x 8 lowest frequencies against their median: 64 bits, as
``imagehash.phash`` computes it) keeps what survives resizing, so a copy at another size,
with another filter or re-encoded as JPEG lands within a few bits of the stored image's.
It is written here with numpy (a 32 x 32 cosine matrix) rather than taken from imagehash:
the grey image comes from the one resize (``convert.model_input``: the bit-depth rule, 16-
bit kept exact), and the DCT runs on a whole batch at once (an ingest chunk, a backfill)
where imagehash takes one PIL image at a time and pulls in SciPy and PyWavelets.

A hash near another is a candidate, never a verdict: the search confirms it by pixel
correlation (``grey`` at a common size; the rule is the leakage audit's).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from medsim.images.convert import TO_8BIT, model_input, resize

HASH_SIZE = 32  # the grey image the DCT reads
LOW = 8  # the 8 x 8 lowest frequencies: 64 bits
MATRIX_MAX = 512  # larger batches are resized by Pillow one by one (the matrix would be the cost)
_n = np.arange(HASH_SIZE)
# DCT-II basis (unnormalised, as scipy.fftpack.dct's default): row k is cos(pi k (2n+1) / 2N)
_DCT = np.cos(np.pi * _n[:LOW, None] * (2 * _n[None, :] + 1) / (2 * HASH_SIZE))
_BITS = (1 << np.arange(63, -1, -1, dtype=np.uint64)).astype(np.uint64)  # first coefficient = highest bit


def grey(x: np.ndarray, size: int) -> np.ndarray:
    """Stored pixels (H, W, C) -> (size, size) float32 grey, through the one resize."""
    return model_input(x, size).mean(axis=2, dtype=np.float32)


def renderings(x: np.ndarray, size: int) -> list[np.ndarray]:
    """Stored pixels -> [(size, size) float32 grey] as a smaller copy of them may have been
    made: the one resize (Lanczos), and Pillow's nearest, bilinear and bicubic from the 8-bit
    grey. A copy shrunk by nearest neighbour keeps every other pixel and folds the rest into
    its low frequencies (a 0.5x copy of a 28 px ultrasound correlates at 0.89 with the
    Lanczos one): only the same filter at the same size gives its pixels back."""
    from PIL import Image

    full = Image.fromarray(np.rint(grey(x, max(x.shape[:2]))).astype(np.uint8))
    out = [grey(x, size)]
    for f in (Image.Resampling.NEAREST, Image.Resampling.BILINEAR, Image.Resampling.BICUBIC):
        out.append(np.asarray(full.resize((size, size), f), dtype=np.float32))
    return out


def phash_grey(g: np.ndarray) -> np.ndarray:
    """(N, 32, 32) grey -> (N,) int64 pHashes (the bit pattern of an unsigned 64-bit hash,
    stored in a bigint column as it is)."""
    low = _DCT @ g.astype(np.float64) @ _DCT.T  # (N, 32, 32) -> (N, 8, 8)
    flat = low.reshape(len(g), LOW * LOW)
    bits = flat > np.median(flat, axis=1, keepdims=True)
    return (bits.astype(np.uint64) * _BITS).sum(axis=1, dtype=np.uint64).view(np.int64)


@lru_cache(maxsize=256)
def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in): the one resize along one axis, as a matrix. Lanczos is linear, so the
    resize of a float image is Ry @ X @ Rx.T; the matrix is read off the resize itself (an
    identity image resized along its rows), so it is that filter's, not a copy of it."""
    eye = np.eye(n_in, dtype=np.float32)[..., None]
    return resize(eye, (n_out, n_in))[..., 0].astype(np.float64)


def hash_greys(x: np.ndarray) -> np.ndarray:
    """(N, H, W, C) stored pixels of one shape -> (N, 32, 32) grey, batched: what grey(x, 32)
    gives image by image (the bit-depth scaling, the resize, one rounding per channel, the
    channels' mean), at numpy's pace: 2-40 us an image of MedMNIST, where Pillow's per-call
    cost is 200 us."""
    f = x.astype(np.float64) / float(TO_8BIT[x.dtype])
    ry, rx = _resize_matrix(x.shape[1], HASH_SIZE), _resize_matrix(x.shape[2], HASH_SIZE)
    out = ry @ f.transpose(0, 3, 1, 2) @ rx.T  # (N, C, H, W) -> (N, C, 32, 32)
    return np.clip(np.rint(out), 0, 255).mean(axis=1)


def phash(x: np.ndarray) -> int:
    """One stored image -> its 64-bit pHash as a signed int (what the bigint column holds).
    Image by image through the one resize itself: an archive's images come in every size,
    and a matrix per size would cost more than it saves."""
    return int(phash_grey(grey(x, HASH_SIZE)[None])[0])


def phashes(xs) -> np.ndarray:
    """Stored images (an (N, H, W[, C]) array of one shape, or a list of (H, W, C)) -> (N,)
    int64; a batch of one shape (a MedMNIST split) by hash_greys: the same hashes (equal on
    6,000 of 6,000 MedMNIST images: the matrix and Pillow round differently in 1 pixel of
    100,000)."""
    if len(xs) == 0:
        return np.zeros(0, np.int64)
    x = xs if not isinstance(xs, np.ndarray) or xs.ndim == 4 else xs[..., None]
    if isinstance(x, np.ndarray) and max(x.shape[1:3]) <= MATRIX_MAX:
        return phash_grey(hash_greys(x))
    return np.array([phash(i) for i in x], np.int64)


def hamming(a: int, b: int) -> int:
    return bin((a ^ b) & 0xFFFFFFFFFFFFFFFF).count("1")

