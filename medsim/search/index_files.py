"""Where a FAISS index lives on disk: its file, the metadata beside it, their checksum and
their removal. A build's file is named after its build, so no build overwrites another."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
from pathlib import Path

from medsim.errors import DataRefused, NotFound
from medsim.queries import Q
from medsim.search import GALLERY_SPLITS


def meta_path(path: Path) -> Path:
    return Path(str(path) + ".json")


def file_sha256(path: Path) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def default_path(index_dir, model_id: int, kind_name: str, build_id: int) -> Path:
    # one file per build: a later build never overwrites the file an earlier row names
    return Path(index_dir) / f"model{model_id}-{kind_name}-build{build_id}.faiss"


@contextlib.contextmanager
def path_lock(path: Path):
    """Held while a build takes its id, writes its file and records its row: builds told to
    write the same file (--out) run that part one after another, so the file always holds
    the build with the highest id among those naming it, the one a search picks. Two
    builds 6 ms apart used to both succeed and leave the file to the lower id, and every
    FAISS search answered 409 (issue 34). flock: released by the kernel when the process
    dies, so a killed build never leaves the path locked; the lock file itself stays
    (removing it would let a third build lock a new inode while the second holds the old)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def rebuild_command(model_id: int, kind_name: str, splits) -> str:
    """The command that builds this index again, as the CLI parses it (tests/test_hints.py)."""
    over = "" if tuple(splits) == GALLERY_SPLITS else f" --splits {','.join(splits)}"
    return f"`medsim index build --model {model_id} --kind {kind_name}{over}`"


META_KEYS = {"build_id": int, "model_id": int, "kind": str, "params": dict, "splits": list, "dim": int,
             "n_rows": int, "fingerprint": str, "file_sha256": str}


def read_meta(path: Path) -> dict:
    """The .json beside an index, or DataRefused naming what is wrong with it."""
    mp = meta_path(path)
    if not mp.exists():
        raise NotFound(f"{path} has no metadata ({mp.name} is missing): rebuild it with `medsim index build`")
    try:
        meta = json.loads(mp.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise DataRefused(f"{mp} is not valid JSON ({err}): rebuild the index with `medsim index build`") from None
    if not isinstance(meta, dict):
        raise DataRefused(f"{mp} is not index metadata: rebuild the index with `medsim index build`")
    bad = [key for key, t in META_KEYS.items() if not isinstance(meta.get(key), t)]
    if bad:
        raise DataRefused(f"{mp} lacks or mangles {', '.join(bad)} (older medsim, or edited): "
                          f"rebuild the index with `medsim index build`")
    return meta


def remove_files_before(conn, deletion_id: int) -> list[str]:
    """Delete the files (and metadata) of every build made before this deletion: they may
    hold the deleted vectors. Their rows stay, as history; loading them says to rebuild."""
    removed = []
    for (path,) in conn.execute(Q.builds_before_deletion, {"deletion_id": deletion_id}).fetchall():
        for p in (Path(path), meta_path(Path(path))):
            if p.exists():
                p.unlink()
                if p.suffix == ".faiss":
                    removed.append(str(p))
    return removed
