"""Deleting is part of owning data: a dataset, one patient's images, or single images go,
with their embeddings, queue rows and (for a dataset) calibrations, in one transaction, and
medsim.deletions records what went and when (names, counts, the patient's keyed hash; never
content).

The case designed for is a patient withdrawing consent: their images are found by the
same keyed hash the ingest stored (sources/keys.py), in every dataset. Copies of the same
pixels stored without the patient (another archive, an export without ids) are found by
their content hash and reported; with_copies deletes them too.

Workers may be embedding the same images meanwhile. A worker locks its queue rows first
(the claim) and the image rows only at its COPY (the foreign-key check); a deletion that
locked images first and then waited for the queue rows deadlocked against it. So the queue
rows go first, waiting for any batch that holds them to commit, and only then the images.
A deadlock that still happens (some other writer) is retried a few times.

A deletion of a patient wins every race with an ingest or a sync that is storing their
images: it takes the patient's lock (queries.sql lock_patient_exclusive) before it looks,
and its medsim.deletions row is the tombstone that every chunk checks under the shared
lock in the transaction that stores (sources/archive.py): nothing of theirs is stored
after the deletion commits, whoever started first. Their PACS instances stay settled, by
the keyed hashes of their UIDs only. Dataset and image deletions leave no tombstone: the
same images come back if their source is ingested or synced again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import psycopg

from medsim.errors import BadArgument, DatabaseUnavailable, NotFound
from medsim.queries import Q, scalar
from medsim.sources import keys
from medsim.sources.base import Problem

RETRIES = 5


@dataclass
class Deleted:
    deletion_id: int
    kind: str
    target: str
    images: int
    embeddings: int
    copies: list = field(default_factory=list)  # (image id, dataset) with the same pixels, not deleted


def delete(conn, *, dataset: str | None = None, patient_id: str | None = None, image_ids=(),
           reason: str | None = None, with_copies: bool = False) -> Deleted:
    """Exactly one of dataset, patient_id, image_ids. The caller's transaction, or its own."""
    if sum(x is not None and x != () and x != [] for x in (dataset, patient_id, list(image_ids) or None)) != 1:
        raise BadArgument("give exactly one of a dataset, a patient id or image ids")
    for attempt in range(RETRIES):
        try:
            return _delete(conn, dataset, patient_id, image_ids, reason, with_copies)
        except psycopg.errors.DeadlockDetected as err:
            if attempt == RETRIES - 1:
                raise DatabaseUnavailable(f"the deletion deadlocked {RETRIES} times with other writers ({err}); "
                                          f"nothing was deleted: try again") from None
            time.sleep(0.1 * 2**attempt)


def _delete(conn, dataset, patient_id, image_ids, reason, with_copies) -> Deleted:
    with conn.transaction():
        if dataset is not None:
            ids = [r[0] for r in conn.execute(Q.images_of_dataset, {"name": dataset})]
            kind, target = "dataset", dataset
            if not ids and scalar(conn, Q.archive_dataset_exists, {"name": dataset}) is None:
                raise NotFound(f"no dataset named {dataset!r}")
        elif patient_id is not None:
            ring = keys.keyring(conn, "a patient is found by the keyed hash of their id")
            key = ring.patient(patient_id)
            conn.execute(Q.lock_patient_exclusive, {"key": key})  # first: see the module's docstring
            ids = [r[0] for r in conn.execute(Q.images_of_patient, {"patient_key": key})]
            kind, target = "patient", key
            if not ids:
                raise NotFound("no images of that patient (with this MEDSIM_PATIENT_KEY)")
            hash_pacs_rows(conn, ring, ids)
        else:
            wanted = sorted({int(i) for i in image_ids})
            ids = [r[0] for r in conn.execute(Q.existing_images, {"ids": wanted})]
            missing = sorted(set(wanted) - set(ids))
            if missing:
                raise NotFound(f"no image with id {', '.join(map(str, missing[:10]))}; nothing was deleted")
            kind, target = "images", f"{len(ids)} image id(s)"
        copies = [tuple(r) for r in conn.execute(Q.copies_elsewhere, {"ids": ids})]
        if with_copies:
            ids = ids + [i for i, _ in copies]
        embeddings = scalar(conn, Q.count_embeddings_of, {"ids": ids})
        conn.execute(Q.dequeue_images, {"ids": ids})  # first: see the module's docstring
        conn.execute(Q.delete_images, {"ids": ids})
        if kind == "dataset":
            conn.execute(Q.delete_dataset, {"name": dataset})
            conn.execute(Q.delete_calibrations_of, {"name": dataset})
        deletion_id = scalar(conn, Q.insert_deletion, {"kind": kind, "target": target, "images": len(ids),
                                                       "embeddings": embeddings, "reason": reason})
    return Deleted(deletion_id, kind, target, len(ids), embeddings, [] if with_copies else copies)


def hash_pacs_rows(conn, ring, ids: list[int]) -> int:
    """A deleted patient's PACS instances keep their rows (a sync must not fetch them again)
    but not their UIDs in clear: each becomes 'k:' + its keyed hash."""
    found = conn.execute(Q.pacs_rows_of_patient, {"ids": ids}).fetchall()
    if found:
        conn.execute(Q.pacs_hash_rows, {
            "source_ids": [r[0] for r in found], "old_sops": [r[3] for r in found], "frames": [r[4] for r in found],
            "studies": [hashed_uid(ring, r[1]) for r in found], "series": [hashed_uid(ring, r[2]) for r in found],
            "sops": [hashed_uid(ring, r[3]) for r in found]})
    return len(found)


def hashed_uid(ring, uid: str) -> str:
    """How medsim.pacs_instances keeps a UID of a withdrawn patient (pacs.py reads both forms)."""
    return keys.HASHED + ring.uid(uid)


class Withdrawn(Problem):
    """An entry of a patient deleted from medsim (their tombstone: a medsim.deletions row)."""

    def __init__(self, deletion_id: int):
        super().__init__(f"patient withdrawn (deletion {deletion_id})")
        self.deletion_id = deletion_id


def refuse_withdrawn(conn, fresh: list, settled: list, report) -> list:
    """Inside an ingest chunk's transaction (archive.write_chunk: `fresh` to store, `settled`
    already decided), before anything is stored: the chunk's patients locked shared
    (queries.sql lock_patients_shared), then their tombstones read. Entries of a withdrawn
    patient are refused, reported and settled as such (in place in `settled`, whatever the
    chunk had made of them) -> the entries still to store."""
    patients = sorted({e.patient_key for e, *_ in (*fresh, *settled) if e.patient_key})
    if not patients:
        return fresh
    conn.execute(Q.lock_patients_shared, {"keys": patients})
    withdrawn = dict(conn.execute(Q.withdrawn_patients, {"keys": patients}).fetchall())
    if not withdrawn:
        return fresh
    for i, (e, *_) in enumerate(settled):
        if e.patient_key in withdrawn:
            settled[i] = (e, None, "refused", Withdrawn(withdrawn[e.patient_key]))
    keep = []
    for item in fresh:
        e = item[0]
        if e.patient_key in withdrawn:
            why = Withdrawn(withdrawn[e.patient_key])
            report.add(e.path, "skipped", str(why))
            settled.append((e, None, "refused", why))
        else:
            keep.append(item)
    return keep
