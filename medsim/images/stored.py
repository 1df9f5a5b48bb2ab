"""Stored bytes <-> arrays. Images are kept raw in (height, width, channels) order,
uint8 or little-endian uint16, so numpy alone decodes them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medsim.errors import DataRefused
from medsim.images.convert import model_input, to_display


def from_bytes(pixels: bytes, h: int, w: int, c: int, bit_depth: int = 8) -> np.ndarray:
    """Stored bytes -> (h, w, c) uint8 or uint16, exactly as kept. ValueError if inconsistent."""
    if c not in (1, 3):
        raise ValueError(f"unsupported channel count {c}")
    if bit_depth not in (8, 16):
        raise ValueError(f"unsupported bit depth {bit_depth}")
    if h < 1 or w < 1:
        raise ValueError(f"empty image ({h}x{w})")
    n = h * w * c * bit_depth // 8
    if len(pixels) != n:
        raise ValueError(f"pixel data is {len(pixels)} bytes, expected {h}x{w}x{c} at {bit_depth} bits = {n}")
    return np.frombuffer(pixels, np.uint8 if bit_depth == 8 else "<u2").reshape(h, w, c).astype(
        np.uint8 if bit_depth == 8 else np.uint16, copy=False)


def to_bytes(x: np.ndarray) -> bytes:
    """Stored-form pixels -> the bytes a row keeps (16-bit little-endian)."""
    return x.astype(x.dtype.newbyteorder("<")).tobytes()


@dataclass
class StoredRow:
    """An image row's pixel columns, as the queries that read pixels return them."""

    id: int
    pixels: bytes
    height: int
    width: int
    channels: int
    bit_depth: int

    def array(self) -> np.ndarray:
        """The stored pixels, exactly as kept. ValueError for a row stored broken."""
        return from_bytes(bytes(self.pixels), self.height, self.width, self.channels, self.bit_depth)

    def model_input(self, size: int) -> np.ndarray:
        """(size, size, 3) uint8: what the network sees of this image."""
        return model_input(self.array(), size)

    def checked(self, convert, *args):
        """convert(array, *args) for a user's request: a row stored broken (a 0x0 image,
        truncated bytes) is DataRefused naming it, never a traceback."""
        try:
            return convert(self.array(), *args)
        except ValueError as err:
            raise DataRefused(f"image {self.id} is stored broken ({err}); it cannot be shown or searched") from None

    def model_input_or_refuse(self, size: int) -> np.ndarray:
        return self.checked(model_input, size)

    def display_or_refuse(self, window: str = "stored") -> np.ndarray:
        return self.checked(to_display, window)
