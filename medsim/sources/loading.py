"""How an archive's pixels are read: by file (a DICOM file's frames together, so the file
is decoded once), in chunks that never split a file, in worker processes for big archives.
"""

from __future__ import annotations

import contextlib
import ctypes
import signal

from medsim.errors import Unreadable
from medsim.sources.base import Entry


def load_group(loader, group: list[Entry]) -> list[tuple]:
    """The entries of one file -> [(entry, Loaded or Unreadable)], the file read once;
    module-level so worker processes can run it. Anything but Unreadable (a PACS that went
    away) stops the ingest: what is committed stays, and the next run resumes."""
    try:
        got = loader(group)
    except Unreadable as err:
        return [(e, err) for e in group]
    return list(zip(group, got, strict=True))


def by_file(entries: list[Entry]) -> list[list[Entry]]:
    """Consecutive entries of one file (a DICOM file's frames) as one group."""
    groups, last = [], None
    for e in entries:
        key = e.file or e.path
        if groups and key == last:
            groups[-1].append(e)
        else:
            groups.append([e])
            last = key
    return groups


def whole_files(groups: list[list[Entry]], size: int):
    """Chunks of about `size` entries that never split a file: a crash leaves each file's
    frames all written or none."""
    part, n = [], 0
    for g in groups:
        part.append(g)
        n += len(g)
        if n >= size:
            yield part
            part, n = [], 0
    if part:
        yield part


def ahead(pool, load, parts, workers: int):
    """Each chunk's loaded entries, the next chunk already submitted while this one is
    written: the worker processes decode (or fetch) while the main process hashes and COPYs.
    Small tasks (a few groups each), so that a chunk of a few big groups (a PACS's series)
    spreads over every worker instead of landing on one."""
    pending = None
    for part in parts:
        submitted = pool.map(load, part, chunksize=max(1, len(part) // (workers * 4)))
        if pending is not None:
            yield [pair for got in pending for pair in got]
        pending = submitted
    if pending is not None:
        yield [pair for got in pending for pair in got]


def die_with_parent() -> None:
    """A decoding process ends when the ingest that started it does, even by SIGKILL
    (Linux's PR_SET_PDEATHSIG; elsewhere it ends when its pipe closes)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


class InlinePool:
    """The pool interface without processes, for small archives."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def map(self, fn, items, chunksize=1):
        return map(fn, items)
