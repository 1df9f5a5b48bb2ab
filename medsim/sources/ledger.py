"""What an ingest of a folder settled of each file: its size, mtime and the sha256 of its
bytes, and what became of it (medsim.source_files). A re-run skips a file whose size and
mtime are unchanged, or whose bytes hash the same (a copy that kept its content), before
decoding a pixel; a re-run that added nothing used to decode every file again (278 s for
76 DICOM files, one of them a 120-frame JPEG cine).

A file is read once: the worker that decodes it hashes the same bytes (read_stamped). A file
refused for its content (damaged, a report, an unknown codec) is settled too, with the
reason: it is not read again until it changes, or until `ingest-folder --recheck`. A file
whose pixels are a label finding (the source labels them otherwise, or two ways) is not
settled: every run reports it again, and --on-conflict relabel can still apply it. A file
whose images were deleted stays settled: a re-run does not bring them back (--recheck
reads it again; a withdrawn patient's images are then refused again by their deletion's
tombstone, sources/deletion.py, and images deleted by id or with their dataset come back).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from medsim.errors import NotFound, Unreadable
from medsim.images import files
from medsim.queries import Q
from medsim.sources import boundary

IN_MEMORY_MAX = 256 * 1024 * 1024  # bigger files are hashed in a stream and decoded from disk


def read_stamped(path: Path) -> tuple[bytes | None, tuple]:
    """(the file's bytes, or None when it is too big to hold; (size, mtime_ns, sha256))."""
    st = files.regular_file(path)  # a FIFO would block the reader
    try:
        if st.st_size <= IN_MEMORY_MAX:
            data = path.read_bytes()
            return data, (len(data), st.st_mtime_ns, hashlib.sha256(data).digest())
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return None, (st.st_size, st.st_mtime_ns, h.digest())
    except OSError as err:
        raise Unreadable(f"cannot be read ({err.strerror})") from None


def listing(entries) -> str:
    """A digest of what the source says of a file's entries (labels, split, patient, study,
    metadata): a manifest that relabels an unchanged file is a change."""
    said = sorted(json.dumps([e.path, list(e.labels), e.split, e.patient_key, e.study_id, e.metadata],
                             sort_keys=True, default=str) for e in entries)
    return hashlib.sha256("\n".join(said).encode()).hexdigest()


def unchanged(conn, dataset_id: int, ring, base: Path, files: dict[str, str]) -> set[str]:
    """The files (relative path -> listing digest) this dataset has settled and that have
    not changed since, neither their bytes nor what the source says of them."""
    keyed = {ring.path(f): f for f in files}
    found = conn.execute(Q.ledger_rows, {"dataset_id": dataset_id, "paths": list(keyed)}).fetchall()
    same, touched = set(), []
    for path_key, size, mtime_ns, sha, said in found:
        rel = keyed[path_key]
        if said != files[rel]:
            continue
        try:
            st = os.stat(base / rel)
        except OSError:
            continue
        if st.st_size != size:
            continue
        if st.st_mtime_ns == mtime_ns:
            same.add(rel)
            continue
        try:  # touched, maybe not changed: the bytes say
            if read_stamped(base / rel)[1][2] == bytes(sha):
                same.add(rel)
                touched.append((path_key, st.st_mtime_ns))
        except Unreadable:
            continue
    if touched:
        with conn.transaction():
            for path_key, mtime_ns in touched:
                conn.execute(Q.ledger_touch, {"dataset_id": dataset_id, "path": path_key, "mtime_ns": mtime_ns})
    return same


def settle(base: Path, ring, scrub, said: dict, conn, dataset_id: int, settled: list) -> None:
    """Inside a chunk's transaction (ingest_archive's hook): each file of the chunk, once."""
    files: dict[str, list] = {}
    for e, _, outcome, reason in settled:
        files.setdefault(e.file or e.path, []).append((e, outcome, reason))
    # a label finding is read again next time, both of its files: to report it again, or to
    # apply it with --on-conflict relabel
    open_ = {f for f, got in files.items() if any(o in ("label_changed", "label_conflict") for _, o, _ in got)}
    open_ |= {r for got in files.values() for _, o, r in got if o == "label_conflict"}
    for rel in open_ - set(files):  # the first file of a conflict, settled in an earlier chunk
        conn.execute(Q.ledger_forget, {"dataset_id": dataset_id, "path": ring.path(rel)})
    for rel, got in files.items():
        if rel in open_:
            continue
        stamp = next((e.stamp for e, _, _ in got if e.stamp), None)
        if stamp is None:
            try:
                stamp = read_stamped(base / rel)[1]
            except Unreadable:
                continue  # gone or unreadable now: not settled, looked at again next time
        refused = [r for _, o, r in got if o == "refused"]
        outcome = "refused" if len(refused) == len(got) else "stored"
        conn.execute(Q.ledger_settle, {"dataset_id": dataset_id, "path": ring.path(rel), "size": stamp[0],
                                       "mtime_ns": stamp[1], "sha256": stamp[2], "outcome": outcome,
                                       "listing": said[rel],
                                       "reason": scrub(str(refused[0]), rel) if outcome == "refused" else None})


def locate(conn, ring, image_id: int, root: Path, follow_links: bool = False) -> str | None:
    """The file under `root` (an archive's folder, or its manifest's) that image_id came from,
    or None. medsim keeps file paths only keyed: the admin names the folder, and each file's
    path is hashed with the key until one matches (a frame's or a slice's index is in the
    image's metadata)."""
    found = conn.execute(Q.image_source_path, {"id": image_id}).fetchone()
    if found is None:
        raise NotFound(f"no image with id {image_id}")
    stored, meta = found
    if stored is None:
        return None
    suffix = (f"#frame{meta['frame']}" if "frame" in (meta or {}) else
              f"#slice{meta['slice']}" if "slice" in (meta or {}) else "")
    listed, _ = boundary.walk(Path(root), follow_links)
    for rel, _size in listed:
        if ring.path(f"{rel}{suffix}") == stored:
            return f"{rel}{suffix}"
    return None
