"""The network's input size and preset for a training run: the archive's own size.

`medsim train --image-size N` sets it; without it, the median stored size of the training
datasets' train images (their shorter side), rounded down to a multiple of 16 and capped
by what trains in minutes on this device (config.SIZE_BUDGET). MedMNIST's 28 px subsets
(and any archive whose images are 28 px or smaller) keep the native 28 px network, so the
demo and MedMNIST training are unchanged. The preset follows the size (28: the default
net, larger: ResNet-18) unless one is named.
"""

from __future__ import annotations

from dataclasses import dataclass

from medsim.errors import BadArgument
from medsim.model.config import MAX_INPUT, MIN_INPUT, PRESETS, SIZE_BUDGET, preset_for_size
from medsim.queries import Q, one


@dataclass
class Sides:
    median_side: int | None
    largest_side: int | None
    images: int


def check_size(n) -> None:
    if n is None:
        return
    if not isinstance(n, int) or isinstance(n, bool) or not MIN_INPUT <= n <= MAX_INPUT:
        raise BadArgument(f"image size must be an integer from {MIN_INPUT} to {MAX_INPUT} px, got {n!r}")


def archive_size(median_side: int | None, device: str = "cpu") -> int:
    """The default input size for images whose median shorter side is median_side."""
    if median_side is None or median_side <= 28:
        return 28
    cap = SIZE_BUDGET["cuda" if str(device).startswith("cuda") else "cpu"]
    return max(32, min(cap, median_side // 16 * 16))


def resolve(preset: str | None, size: int | None, sides: Sides, device: str = "cpu") -> tuple[str, int, str | None]:
    """-> (preset, input size, a warning line or None).

    preset None: chosen from the size. A named preset without a size: the default and
    seed nets keep their own size (what callers of TrainConfig() always got), the resnet
    takes the archive's."""
    check_size(size)
    if size is None:
        if preset in ("default", "seed"):
            size = PRESETS[preset].image_size
        else:
            size = archive_size(sides.median_side, device)
    name = preset or preset_for_size(size)
    warning = None
    if sides.largest_side and size > sides.largest_side:
        warning = (f"input size {size} px is larger than the largest stored training image "
                   f"({sides.largest_side} px): images are upscaled, which adds cost and no detail")
    return name, size, warning


def stored_sides(conn, flags, medmnist_size: int) -> Sides:
    return one(conn, Q.train_image_sides, {"flags": flags, "size": medmnist_size}, as_=Sides)
