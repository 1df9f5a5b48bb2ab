"""FAISS index kinds as data: one entry per kind, and the CLI's choices come from here.

A kind is a ``faiss.index_factory`` string whose {placeholders} are filled from its
parameters, the parameters set through ``faiss.ParameterSpace`` at build time and
whenever the index is loaded (search time), and defaults for a gallery of n vectors
of a given dimension. No FAISS import here: the CLI builds its parser from this table.
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable
from dataclasses import dataclass

from medsim.errors import BadArgument


def _nlist(n: int) -> int:
    # about 4 sqrt(n) lists, but at least 39 training points per list (k-means' own floor)
    return int(max(1, min(4 * math.sqrt(max(n, 1)), n // 39 or 1)))


def _nprobe(nlist: int) -> int:
    # a quarter of the lists on small galleries (45 of 180 at 7k images: recall 1.0), but
    # not a fixed share: at 1M images (4,000 lists) a quarter scans 250k vectors per query,
    # a quarter of brute force. 4 sqrt(nlist) grows like the lists' own size.
    return max(1, min(nlist // 4, int(4 * math.sqrt(nlist))))


@dataclass(frozen=True)
class Kind:
    name: str
    about: str  # one line for --help
    # faiss.index_factory string; {placeholders} come from the parameters. "np" after a PQ
    # turns off polysemous training, which the factory otherwise adds (27 s on 7k vectors)
    factory: str
    defaults: Callable[[int, int], dict]  # (n vectors, dim) -> every parameter's default
    build_params: tuple[str, ...] = ()  # set through ParameterSpace before vectors are added
    search_params: tuple[str, ...] = ()  # set through ParameterSpace whenever it is loaded

    def factory_params(self) -> tuple[str, ...]:
        return tuple(f for _, f, _, _ in string.Formatter().parse(self.factory) if f)

    def param_names(self) -> tuple[str, ...]:
        return self.factory_params() + self.build_params + self.search_params


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("flat", "exact search (brute force)", "IDMap2,Flat", lambda n, d: {}),
    Kind("hnsw", "graph index, no training", "IDMap2,HNSW{M}",
         lambda n, d: {"M": 32, "efConstruction": 80, "efSearch": 64},
         build_params=("efConstruction",), search_params=("efSearch",)),
    Kind("ivfflat", "inverted lists over k-means cells", "IVF{nlist},Flat",
         lambda n, d: {"nlist": _nlist(n), "nprobe": _nprobe(_nlist(n))}, search_params=("nprobe",)),
    Kind("ivfpq", "inverted lists + product quantisation (compressed)", "IVF{nlist},PQ{M}x{nbits}np",
         lambda n, d: {"nlist": _nlist(n), "M": max(1, d // 2), "nbits": 8, "nprobe": _nprobe(_nlist(n))},
         search_params=("nprobe",)),
    # the published notebook's index: IVFPQ, nlist 2, M 4, 8 bits, nprobe 10
    Kind("seed", "the published notebook's IVFPQ (nlist 2, M 4, 8 bits, nprobe 10)", "IVF{nlist},PQ{M}x{nbits}np",
         lambda n, d: {"nlist": 2, "M": 4, "nbits": 8, "nprobe": 10}, search_params=("nprobe",)),
)}


def kind(name: str) -> Kind:
    if name not in KINDS:
        raise BadArgument(f"unknown index kind {name!r}; choose from {', '.join(KINDS)}")
    return KINDS[name]


def resolve_params(k: Kind, given: dict, n: int, dim: int) -> dict:
    """Defaults overridden by `given`; refuses unknown or impossible values before FAISS
    does (its C++ assertions end in a RuntimeError several lines long, after the vectors
    have been read)."""
    unknown = sorted(set(given) - set(k.param_names()))
    if unknown:
        raise BadArgument(f"unknown parameter(s) {', '.join(unknown)} for a {k.name} index; "
                          f"known: {', '.join(k.param_names()) or 'none'}")
    p = {**k.defaults(n, dim), **given}
    bad = [f"{key}={v}" for key, v in p.items() if not isinstance(v, int) or v < 1]
    if bad:
        raise BadArgument(f"{k.name} index parameters must be positive integers: {', '.join(bad)}")
    if "nlist" in p and p["nlist"] > n:
        raise BadArgument(f"nlist={p['nlist']} is more lists than the {n} vectors to cluster; "
                          f"use at most {n} (default for this gallery: {k.defaults(n, dim)['nlist']})")
    if "nbits" in p and not 1 <= p["nbits"] <= 16:
        raise BadArgument(f"nbits={p['nbits']} must be between 1 and 16")
    if "PQ{M}" in k.factory and dim % p["M"]:
        raise BadArgument(f"PQ M={p['M']} must divide the dimension {dim}")
    return p
