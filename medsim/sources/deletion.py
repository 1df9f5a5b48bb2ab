"""Deleting is part of owning data: a dataset, one patient's images, or single images go,
with their embeddings and queue rows, in one transaction, and medsim.deletions records
what went and when (names, counts, the patient's keyed hash; never content).

The case designed for is a patient withdrawing consent: their images are found by the
same keyed hash the ingest stored (MEDSIM_PATIENT_KEY), in every dataset. FAISS files
built before a deletion may still hold the deleted vectors, so they refuse to load
(search/faiss_index.py) and the command names the files to remove.
"""

from __future__ import annotations

from dataclasses import dataclass

from medsim.errors import BadArgument, NotFound
from medsim.queries import Q, scalar
from medsim.sources.base import patient_hasher


@dataclass
class Deleted:
    deletion_id: int
    kind: str
    target: str
    images: int
    embeddings: int


def delete(conn, *, dataset: str | None = None, patient_id: str | None = None, image_ids=(),
           reason: str | None = None) -> Deleted:
    """Exactly one of dataset, patient_id, image_ids. The caller's transaction, or its own."""
    if sum(x is not None and x != () and x != [] for x in (dataset, patient_id, list(image_ids) or None)) != 1:
        raise BadArgument("give exactly one of a dataset, a patient id or image ids")
    with conn.transaction():
        if dataset is not None:
            ids = [r[0] for r in conn.execute(Q.images_of_dataset, {"name": dataset})]
            kind, target = "dataset", dataset
            if not ids and scalar(conn, Q.archive_dataset_exists, {"name": dataset}) is None:
                raise NotFound(f"no dataset named {dataset!r}")
        elif patient_id is not None:
            key = patient_hasher()(patient_id)
            ids = [r[0] for r in conn.execute(Q.images_of_patient, {"patient_key": key})]
            kind, target = "patient", key
            if not ids:
                raise NotFound("no images of that patient (with this MEDSIM_PATIENT_KEY)")
        else:
            wanted = sorted({int(i) for i in image_ids})
            ids = [r[0] for r in conn.execute(Q.existing_images, {"ids": wanted})]
            missing = sorted(set(wanted) - set(ids))
            if missing:
                raise NotFound(f"no image with id {', '.join(map(str, missing[:10]))}; nothing was deleted")
            kind, target = "images", f"{len(ids)} image id(s)"
        embeddings = scalar(conn, Q.count_embeddings_of, {"ids": ids})
        conn.execute(Q.delete_images, {"ids": ids})
        if kind == "dataset":
            conn.execute(Q.delete_dataset, {"name": dataset})
        deletion_id = scalar(conn, Q.insert_deletion, {"kind": kind, "target": target, "images": len(ids),
                                                       "embeddings": embeddings, "reason": reason})
    return Deleted(deletion_id, kind, target, len(ids), embeddings)
