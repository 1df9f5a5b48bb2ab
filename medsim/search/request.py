"""What a person asks a search for: the query (a stored image, a file, an upload's bytes, a
raw vector), how many neighbours, from which engine, under which filters. Built by the CLI
and by the HTTP service alike; checked here, before any work."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from medsim.errors import BadArgument
from medsim.search import ENGINES, GALLERY_SPLITS, MAX_K, SPLITS

# What a filter may hold, checked before any SQL: a hostile list (100,000 labels, 0.7 MB)
# held a backend for the whole statement timeout. A real filter names a few labels or
# sites; an archive's label names and metadata values are short.
MAX_FILTER_KEYS = 20
MAX_FILTER_VALUES = 1_000  # per key
MAX_FILTER_VALUE_CHARS = 200  # per key and per value
FILTER_LIMITS = (f"a filter takes at most {MAX_FILTER_KEYS} keys, at most {MAX_FILTER_VALUES:,} values per key and "
                 f"at most {MAX_FILTER_VALUE_CHARS} characters per key or value")

# a request body other than an image upload (JSON, checked by the service before it is
# parsed): 25 times a vector of 2,048 numbers, 5 times a filter key at the limits above
MAX_JSON_BYTES = 2**20

MAX_ID = 2**63 - 1  # PostgreSQL's bigint: a larger number is no image's id, refused before SQL
ASCII_ID = re.compile(r"[0-9]{1,19}")


def parse_id(text: str) -> int | None:
    """An image id written in ASCII digits -> the id; None for anything else. Not
    str.isdigit, which takes '²' (that int() then refuses: a 500) and other scripts' digits
    (that int() reads: '١٢' was image 12)."""
    if ASCII_ID.fullmatch(text) and int(text) <= MAX_ID:
        return int(text)
    return None


def check_where(where: dict) -> dict:
    """A filter's keys and values (strings, or lists of strings), bounded: BadArgument in
    one sentence naming the limits, before any SQL sees it."""
    bad = [k for k, v in where.items()
           if not isinstance(v, str) and not (isinstance(v, list) and all(isinstance(x, str) for x in v))]
    if bad:
        raise BadArgument(f"filter values must be strings or lists of strings: {', '.join(map(str, bad[:5]))}")
    values = [[v] if isinstance(v, str) else v for v in where.values()]
    longest = max([len(str(k)) for k in where] + [len(x) for v in values for x in v], default=0)
    most = max(map(len, values), default=0)
    if len(where) > MAX_FILTER_KEYS or most > MAX_FILTER_VALUES or longest > MAX_FILTER_VALUE_CHARS:
        raise BadArgument(f"{FILTER_LIMITS}; this one has {len(where)} key(s), {most:,} value(s) under one of them "
                          f"and {longest:,} characters in its longest")
    return where


@dataclass(frozen=True)
class ById:
    image_id: int
    kind = "image_id"


@dataclass(frozen=True)
class ByFile:
    path: str
    kind = "file"


@dataclass(frozen=True)
class ByUpload:
    data: bytes = field(repr=False)
    name: str = "the upload"
    max_pixels: int | None = None  # the service's own limit (default: settings)
    kind = "upload"


@dataclass(frozen=True)
class ByPixels:
    """Pixels already decoded to their stored form (an upload the service kept)."""

    pixels: object = field(repr=False)  # (H, W, C) uint8 or uint16
    name: str = "the upload"
    kind = "upload"


@dataclass(frozen=True)
class ByVector:
    values: tuple
    kind = "vector"


@dataclass
class Filters:
    """What a search may return. `where`: dataset, split, label, modality or any metadata
    key -> a value or a list of values (medsim.gallery_match). The query's own patient is
    left out unless include_own_patient; per_patient caps images per patient."""

    where: dict = field(default_factory=dict)
    include_own_patient: bool = False
    per_patient: int | None = None
    # which splits form the gallery: every split by default (medsim.gallery, what FAISS
    # builds hold by default); train alone for the evaluation protocol. A comma-separated
    # string is taken too (form fields, the CLI).
    splits: tuple | str = GALLERY_SPLITS

    def __post_init__(self):
        names = self.splits.split(",") if isinstance(self.splits, str) else list(self.splits)
        names = [n.strip() for n in names if n and n.strip()]
        unknown = sorted(set(names) - set(SPLITS))
        if unknown or not names:
            raise BadArgument(f"splits must be some of {', '.join(SPLITS)} (comma-separated), got "
                              f"{', '.join(unknown) if unknown else 'none'}")
        self.splits = tuple(s for s in SPLITS if s in names)
        if self.per_patient is not None and not 1 <= self.per_patient <= MAX_K:
            raise BadArgument(f"per_patient must be between 1 and {MAX_K}, got {self.per_patient}")
        check_where(self.where)
        if "split" in self.where:
            wanted = [self.where["split"]] if isinstance(self.where["split"], str) else self.where["split"]
            outside = sorted(set(wanted) - set(self.splits))
            if outside:
                raise BadArgument(f"this search's gallery holds only {', '.join(self.splits)}; split "
                                  f"{', '.join(outside)} is never returned (splits={','.join(SPLITS)} searches every "
                                  f"split)")

    def exclude_patient(self, patient_key: str | None) -> str | None:
        return None if self.include_own_patient else patient_key


@dataclass
class Request:
    query: ById | ByFile | ByUpload | ByPixels | ByVector
    k: int = 4
    engine: str = "pgvector"
    filters: Filters = field(default_factory=Filters)
    model: int | str | None = "current"
    max_distance: float | None = None  # neighbours farther than this are dropped
    # a region of the query, [x0, y0, x1, y1] in its own pixel coordinates (x1, y1 excluded):
    # only that part is embedded (resized by the one resize path); not for a vector
    box: tuple | None = None
    coverage: float = 0.9  # the diagnosis set's: P(the query's label is in it), 0.5-0.99

    def __post_init__(self):
        if not isinstance(self.k, int) or not 1 <= self.k <= MAX_K:
            raise BadArgument(f"k must be between 1 and {MAX_K}, got {self.k}")
        if not isinstance(self.coverage, int | float) or not 0.5 <= self.coverage <= 0.99:
            raise BadArgument(f"coverage must be between 0.5 and 0.99, got {self.coverage}")
        if self.engine not in ENGINES:
            raise BadArgument(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.max_distance is not None and not self.max_distance >= 0:
            raise BadArgument(f"max_distance must not be negative, got {self.max_distance}")
        if self.box is not None:
            if isinstance(self.query, ByVector):
                raise BadArgument("a region (box) needs an image to cut it from, not a vector")
            b = tuple(self.box)
            if len(b) != 4 or not all(isinstance(v, int) and not isinstance(v, bool) for v in b):
                raise BadArgument(f"a box is four whole numbers [x0, y0, x1, y1] in the query's pixels, got {self.box}")
            x0, y0, x1, y1 = b
            if min(b) < 0:
                raise BadArgument(f"the box {list(b)} reaches outside the image (negative coordinates)")
            if x1 <= x0 or y1 <= y0:
                raise BadArgument(f"the box {list(b)} is empty or inverted: it needs x0 < x1 and y0 < y1")
            self.box = b
