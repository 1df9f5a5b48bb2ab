"""Deterministic train/val/test splits for archives that come without one.

Grouped by patient (no patient's images in two splits: a model that saw the patient in
training would be flattered by their other images at test time), stratified by label
(every label gets about the same fractions), seeded (the same archive and seed give the
same splits). Images without a patient id are groups of one.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

import numpy as np

from medsim.errors import BadArgument

DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)
SPLITS = ("train", "val", "test")


def parse_fractions(text: str) -> tuple[float, float, float]:
    try:
        parts = [float(p) for p in text.split(",")]
    except ValueError:
        raise BadArgument(f"--split-fractions expects three numbers like 70,10,20, got {text!r}") from None
    if len(parts) != 3 or min(parts) < 0 or sum(parts) <= 0:
        raise BadArgument(f"--split-fractions expects three non-negative numbers like 70,10,20, got {text!r}")
    total = sum(parts)
    return tuple(p / total for p in parts)


def group_label(labels: list[tuple]) -> tuple:
    """A group's stratum: its most common label (ties: the smallest)."""
    counts = defaultdict(int)
    for lab in labels:
        counts[lab] += 1
    return min(counts, key=lambda lab: (-counts[lab], lab))


def assign(groups: dict[str, list[tuple]], seed: int = 0,
           fractions=DEFAULT_FRACTIONS) -> dict[str, str]:
    """groups: group id -> the labels of its images. -> group id -> split.

    Within each stratum the groups are put in a seeded order, then dealt to the split
    whose share of the stratum's images is furthest below its target: the fractions are
    met in images, not groups, as closely as whole groups allow.
    """
    strata = defaultdict(list)
    for gid, labels in groups.items():
        strata[group_label(labels)].append(gid)
    out = {}
    for stratum in sorted(strata):
        # order by a seeded hash of the group id: stable under additions to other strata
        gids = sorted(strata[stratum], key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).digest())
        have = np.zeros(3)
        for gid in gids:
            n = len(groups[gid])
            want = np.asarray(fractions) * (have.sum() + n)
            split = int(np.argmax(want - have))
            have[split] += n
            out[gid] = SPLITS[split]
    return out
