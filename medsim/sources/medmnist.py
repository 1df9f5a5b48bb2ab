"""The MedMNIST catalogue: which files exist, where to find or fetch them, and whether a
file on disk is the one the catalogue describes.

The catalogue itself (urls, md5s, label names, licences, split sizes) is the
``medmnist`` package's ``INFO``; we only read it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from medsim import settings
from medsim.errors import BadArgument, DataMissing, DataRefused, MedsimError

SPLITS = ("train", "val", "test")
SIZES = (28, 64, 128, 224)
DOWNLOAD_TIMEOUT_S = 15


@lru_cache(maxsize=1)
def _medmnist_info():
    # Load medmnist/info.py by path: importing the `medmnist` package pulls in torch and
    # torchvision (seconds) just to read a dict.
    spec = importlib.util.find_spec("medmnist")
    if spec is None or not spec.submodule_search_locations:
        raise MedsimError("the medmnist package is not installed (pip install medmnist)")
    path = Path(next(iter(spec.submodule_search_locations))) / "info.py"
    info_spec = importlib.util.spec_from_file_location("_medsim_medmnist_info", path)
    module = importlib.util.module_from_spec(info_spec)
    info_spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class Entry:
    flag: str
    size: int
    python_class: str
    description: str
    task: str
    n_channels: int
    label_names: dict[str, str]
    n_samples: dict[str, int]
    license: str
    url: str
    md5: str

    @property
    def filename(self) -> str:
        return f"{self.flag}.npz" if self.size == 28 else f"{self.flag}_{self.size}.npz"

    @property
    def multi_label(self) -> bool:
        return self.task.startswith("multi-label")

    @property
    def n_classes(self) -> int:
        return len(self.label_names)


# Label names people can read, where MedMNIST's INFO has only numbers: RetinaMNIST's labels
# are diabetic-retinopathy grades (DeepDRiD; the international clinical DR scale). The one
# place names are defined for MedMNIST subsets; an archive's names are its own class
# folders or manifest labels. Revision 0017 renames them in databases ingested before.
READABLE_LABELS = {
    "retinamnist": {"0": "grade 0 (no retinopathy)", "1": "grade 1 (mild)", "2": "grade 2 (moderate)",
                    "3": "grade 3 (severe)", "4": "grade 4 (proliferative)"},
}


def flags_2d() -> list[str]:
    return [f for f in _medmnist_info().INFO if not f.endswith("3d")]


def entry(flag: str, size: int = 28) -> Entry:
    info = _medmnist_info().INFO
    flag = flag.lower()
    if flag not in info or flag.endswith("3d"):
        raise BadArgument(f"unknown 2D MedMNIST flag {flag!r}; known: {', '.join(flags_2d())}")
    if size not in SIZES:
        raise BadArgument(f"size must be one of {SIZES}, got {size}")
    d = info[flag]
    suffix = "" if size == 28 else f"_{size}"
    return Entry(
        flag=flag,
        size=size,
        python_class=d["python_class"],
        description=d["description"],
        task=d["task"],
        n_channels=int(d["n_channels"]),
        label_names=READABLE_LABELS.get(flag, dict(d["label"])),
        n_samples={k: int(v) for k, v in d["n_samples"].items()},
        license=d["license"],
        url=d[f"url{suffix}"],
        md5=d[f"MD5{suffix}"],
    )


def search_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """--data-dir if given; else $MEDSIM_DATA_DIR and the medmnist package's default root."""
    if data_dir is not None:
        return [Path(data_dir).expanduser()]
    dirs = [settings.get().data_dir] if settings.get().data_dir else []
    dirs.append(Path("~/.medmnist").expanduser())  # medmnist's DEFAULT_ROOT
    return dirs


def file_md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(e: Entry, dest_dir: Path, timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Fetch the file into dest_dir, verifying its md5 before it takes its final name."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    final = dest_dir / e.filename
    part = final.with_suffix(".npz.part")
    h = hashlib.md5()
    with urllib.request.urlopen(e.url, timeout=timeout) as r, open(part, "wb") as out:
        for chunk in iter(lambda: r.read(1 << 20), b""):
            h.update(chunk)
            out.write(chunk)
    if h.hexdigest() != e.md5:
        part.unlink(missing_ok=True)
        raise DataRefused(f"downloaded {e.filename} has md5 {h.hexdigest()}, expected {e.md5}")
    part.rename(final)
    return final


def locate(e: Entry, data_dir=None, allow_download: bool = True) -> Path:
    dirs = search_dirs(data_dir)
    for d in dirs:
        if (d / e.filename).is_file():
            return d / e.filename
    why = "downloading was disabled"
    if allow_download:
        try:
            return download(e, dirs[0])
        except (urllib.error.URLError, OSError, TimeoutError) as err:
            why = f"download failed: {getattr(err, 'reason', err)}"
    raise DataMissing(
        f"{e.filename} ({e.python_class}) not found; searched: {', '.join(str(d) for d in dirs)}; "
        f"{why}. Fetch it from {e.url} (md5 {e.md5}) and put it in one of those directories "
        f"or pass --data-dir."
    )


@dataclass
class Verified:
    path: Path
    md5: str
    official: bool
    images: dict[str, np.ndarray] = field(repr=False)
    labels: dict[str, np.ndarray] = field(repr=False)


# Header checks keep a hostile or broken archive from costing memory or time: the .npy
# header of every member we need is read (a few hundred bytes) and compared with the
# catalogue before a single array is decompressed, and members we do not need are never
# read. A header may declare a terabyte; we only believe it once it matches the catalogue.
MAX_HEADER_BYTES = 1 << 16


@dataclass(frozen=True)
class Member:
    name: str  # the key, e.g. "train_images"
    shape: tuple
    dtype: np.dtype
    stored_bytes: int  # uncompressed size in the archive
    header_bytes: int


def _member_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo, key: str) -> Member:
    with zf.open(info) as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _fortran, dtype = read(f, max_header_size=MAX_HEADER_BYTES)
        return Member(key, tuple(shape), dtype, info.file_size, f.tell())


def read_headers(path: Path) -> tuple[zipfile.ZipFile, dict[str, tuple[zipfile.ZipInfo, Member]]]:
    """Open the archive and read every member's .npy header (never its data)."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise DataRefused(f"{path}: not a .npz archive ({err})") from None
    members = {}
    try:
        for info in zf.infolist():
            key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            if key in EXPECTED_KEYS:
                members[key] = (info, _member_header(zf, info, key))
    except (ValueError, zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as err:
        zf.close()
        raise DataRefused(f"{path}: a member's header is unreadable ({err})") from None
    return zf, members


EXPECTED_KEYS = {f"{s}_{kind}" for s in SPLITS for kind in ("images", "labels")}


def check_headers(e: Entry, members: dict[str, Member]) -> list[str]:
    """Every way the declared arrays differ from the catalogue entry (empty: they match)."""
    problems = []
    img_shape = (e.size, e.size) if e.n_channels == 1 else (e.size, e.size, e.n_channels)
    n_label_cols = e.n_classes if e.multi_label else 1
    for split in SPLITS:
        ik, lk = f"{split}_images", f"{split}_labels"
        if ik not in members or lk not in members:
            problems.append(f"missing key {ik if ik not in members else lk}")
            continue
        x, y = members[ik], members[lk]
        n = e.n_samples[split]
        if x.dtype != np.uint8:
            problems.append(f"{ik} dtype {x.dtype}, expected uint8")
        if x.shape != (n, *img_shape):
            problems.append(f"{ik} shape {x.shape}, expected {(n, *img_shape)}")
        if y.shape != (n, n_label_cols):
            problems.append(f"{lk} shape {y.shape}, expected {(n, n_label_cols)}")
        if not np.issubdtype(y.dtype, np.integer) or y.dtype.itemsize > 8:
            problems.append(f"{lk} dtype {y.dtype}, expected an integer type")
    for m in members.values():
        declared = m.header_bytes + int(np.prod(m.shape, dtype=np.int64)) * m.dtype.itemsize
        if not problems and m.stored_bytes != declared:
            problems.append(f"{m.name} holds {m.stored_bytes} bytes, its header declares {declared}")
    return problems


def check_labels(e: Entry, arrays: dict[str, np.ndarray]) -> list[str]:
    problems = []
    hi = 1 if e.multi_label else e.n_classes - 1
    for split in SPLITS:
        y = arrays[f"{split}_labels"]
        if y.size and (y.min() < 0 or y.max() > hi):
            problems.append(f"{split}_labels values in [{y.min()}, {y.max()}], expected [0, {hi}]")
    return problems


def read_arrays(path: Path, zf: zipfile.ZipFile, members: dict) -> dict[str, np.ndarray]:
    """Decompress the members whose headers passed; a corrupt stream is refused."""
    try:
        out = {}
        for key, (info, _) in members.items():
            with zf.open(info) as f:
                out[key] = np.lib.format.read_array(f, allow_pickle=False, max_header_size=MAX_HEADER_BYTES)
        return out
    except (ValueError, zipfile.BadZipFile, zlib.error, EOFError, OSError) as err:
        raise DataRefused(f"{path}: a member is corrupt ({err})") from None


def verify(e: Entry, path: Path, accept_unofficial: bool = False) -> Verified:
    """official md5 -> accepted; other md5 with the catalogue's structure -> accepted only
    with accept_unofficial; anything else -> DataRefused."""
    digest = file_md5(path)
    zf, members = read_headers(path)
    with zf:
        problems = check_headers(e, {k: m for k, (_, m) in members.items()})
        if problems:
            raise DataRefused(f"{path} does not match the {e.python_class} catalogue: " + "; ".join(problems))
        arrays = read_arrays(path, zf, members)
    problems = check_labels(e, arrays)
    if problems:
        raise DataRefused(f"{path} does not match the {e.python_class} catalogue: " + "; ".join(problems))
    official = digest == e.md5
    if not official and not accept_unofficial:
        raise DataRefused(
            f"{path} is not the official {e.filename}: md5 {digest}, official {e.md5}. Its keys, "
            f"shapes and split counts match the catalogue; pass --accept-unofficial to ingest it "
            f"(it will be recorded as unofficial with its md5)."
        )
    return Verified(
        path=path,
        md5=digest,
        official=official,
        images={s: arrays[f"{s}_images"] for s in SPLITS},
        labels={s: arrays[f"{s}_labels"] for s in SPLITS},
    )
