"""Ingest an archive (a folder, a manifest, a DICOM export) into medsim.datasets / images.

The guarantees are MedMNIST's: Postgres holds everything, nothing is half-written, bad
input gets a clear reason. What differs is that an archive is large, grows and is messy:
- it is written in chunks, each its own transaction, so a crash loses at most the chunk in
  flight and a re-run adds only what is not there yet. Each chunk locks the dataset's row
  and only then asks which of its images (by content sha256) are there: any number of runs
  of one folder at once store each image once;
- a file that cannot be read is skipped and reported; --strict reads everything first and
  refuses the whole archive if anything is wrong;
- the same pixels under two labels are a finding, never a coin toss: within one source the
  first file (in path order) gives the label and every other label is a `label_conflict`;
  a source that labels stored pixels otherwise is a `label_changed` finding, applied only
  with on_conflict="relabel" and only when all of the source's files agree, so re-running
  an unchanged source never changes a label;
- file paths, patient ids, study ids and DICOM UIDs are stored as keyed hashes (keys.py);
- a patient deleted from medsim stays deleted: each chunk checks the patients' tombstones
  under their lock, in its own transaction, and refuses their images (deletion.py);
- without a split from the source, splits are assigned (splits.py) grouped by patient and
  stratified by label, and an already-known patient keeps their split.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial

from psycopg.types.json import Jsonb

from medsim import images
from medsim.errors import BadArgument, DataRefused, Unreadable
from medsim.images import perceptual
from medsim.queries import Q, rows, scalar
from medsim.sources import deletion, keys, ledger
from medsim.sources import report as reports
from medsim.sources import splits as splitting
from medsim.sources.base import Entry
from medsim.sources.loading import (
    InlinePool,
    ahead,
    by_file,
    die_with_parent,
    load_group,
    whole_files,
)
from medsim.sources.report import ArchiveReport

CHUNK = 500
COPY_TYPES = ["int4", "text", "int4", "int2[]", "int4", "int4", "int2", "bytea", "bytea", "int2", "text",
              "text", "jsonb", "text", "int4", "int4", "int8"]
ON_CONFLICT = ("keep", "relabel")
UID_TAGS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


@dataclass
class DatasetRow:
    id: int
    source_kind: str
    label_names: dict
    task: str
    image_size: int


@dataclass
class Stored:
    id: int
    sha256: bytes
    labels: list


def label_vector(names: tuple, vocab: dict[str, int], multi: bool) -> list[int]:
    if multi:
        flags = [0] * len(vocab)
        for n in names:
            flags[vocab[n]] = 1
        return flags
    return [vocab[names[0]]]


def ingest_archive(conn, source, name: str, *, strict: bool = False, on_conflict: str = "keep", seed: int = 0,
                   fractions=splitting.DEFAULT_FRACTIONS, progress: bool = True, workers: int | None = None,
                   chunk: int = CHUNK, relabel: bool | None = None, record=None,
                   recheck: bool = False) -> ArchiveReport:
    """Load every usable image of `source` into the dataset `name` (created if new).
    ``record(conn, dataset_id, settled)``, when given, runs inside each chunk's transaction
    with what became of each of its entries: (entry, image id or None, outcome, reason);
    outcome is stored, unchanged, duplicate, refused, label_changed or label_conflict (whose
    reason is the file of the first entry with those pixels).
    ``recheck``: read every file, even those the ledger says are settled and unchanged."""
    if relabel is not None:  # the older spelling
        on_conflict = "relabel" if relabel else on_conflict
    if on_conflict not in ON_CONFLICT:
        raise BadArgument(f"on_conflict must be one of {', '.join(ON_CONFLICT)}, got {on_conflict!r}")
    t0 = time.perf_counter()
    ring = keys.keyring(conn, "an archive's file names, patient ids and DICOM UIDs can name a person")
    reports.mark_interrupted(conn)
    workers = workers if workers is not None else (os.cpu_count() or 1)
    entries, listing_problems = source.entries()
    multi = any(len(e.labels) > 1 for e in entries)
    for e in entries:
        e.patient_key = ring.patient(e.patient_id) if e.patient_id else None
    ds, vocab = dataset_for(conn, source, name, entries, multi, ring)
    options = json.dumps({"strict": strict, "on_conflict": on_conflict, "seed": seed, "fractions": list(fractions),
                          "max_side": source.max_side})
    report = ArchiveReport(name, ds.id, reports.open_report(conn, ds.id, ring.path(source.describe()), options),
                           listed=len(entries))
    scrub = partial(_scrub, source.base())
    for path, reason in listing_problems:
        report.add(path, "skipped", reason)
    multi = ds.task.startswith("multi-label")
    if getattr(source, "ledger", False):  # files settled by an earlier run, unchanged: not read again
        # what the source says of each file, before splits are assigned (an assigned split
        # depends on what else is new, and is not the source's word)
        said = {f: ledger.listing(g) for f, g in _files(entries).items()}
        record = partial(_both, [h for h in (record, partial(ledger.settle, source.base(), ring, scrub, said)) if h])
        if not recheck:
            same = ledger.unchanged(conn, ds.id, ring, source.base(), said)
            entries = [e for e in entries if (e.file or e.path) not in same]
            report.unchanged_files = len(same)
    assign_splits(conn, ds, entries, seed, fractions)

    load = partial(load_group, source.loader())
    groups = by_file(entries)
    # Decoding runs in worker processes, one per core: Pillow's per-file Python overhead
    # holds the GIL, and threads gave 2,900 images/s on 2 cores where processes keep both
    # busy. A small archive is not worth starting them for.
    pool = (ProcessPoolExecutor(workers, initializer=die_with_parent) if workers > 1 and len(entries) >= 500
            else InlinePool())
    seen: dict[bytes, tuple] = {}  # digest -> (first path, labels) in this run
    disagree: set[bytes] = set()  # digests this run labels several ways
    changes: dict[bytes, tuple] = {}  # digest -> (stored id, the source's labels) where they differ
    with pool:
        if strict:
            unreadable = [(e.path, str(r)) for got in pool.map(load, groups, chunksize=32) for e, r in got
                          if isinstance(r, Unreadable)]
            bad = listing_problems + unreadable  # the listing's are in the report already
            if bad:
                for path, reason in unreadable:
                    report.add(path, "skipped", reason)
                reports.finish(conn, report, "refused", ring, scrub)
                raise DataRefused(f"{source.describe()}: {len(bad)} file(s) cannot be used (first: {bad[0][0]}: "
                                  f"{bad[0][1]}); nothing was ingested (--strict). Report {report.report_id}.")
        from tqdm import tqdm

        bar = tqdm(total=len(entries), unit="img", desc=f"ingest {name}", disable=not progress, leave=False)
        for batch in ahead(pool, load, whole_files(groups, chunk), workers):
            fresh, settled = [], []
            for e, r in batch:
                e.stamp = getattr(r, "stamp", None)
                if isinstance(r, Unreadable):
                    report.add(e.path, "skipped", str(r))
                    settled.append((e, None, "refused", r))
                    continue
                if r.note:  # what a decoder printed: the file's report line, not the terminal (images/chatter.py)
                    report.add(e.path, "decoder", r.note)
                digest = hashlib.sha256(r.pixels.tobytes()).digest()
                labels = label_vector(e.labels, vocab, multi)
                if digest in seen:
                    first, first_labels, first_file = seen[digest]
                    settled.append((e, None, "duplicate", f"the same pixels as {first}") if first_labels == labels
                                   else (e, None, "label_conflict", first_file))
                    if first_labels == labels:
                        report.duplicates += 1
                        report.add(e.path, "duplicate", "the same pixels as {other}", first)
                    else:
                        report.label_conflicts += 1
                        disagree.add(digest)
                        report.add(e.path, "label_conflict", f"the same pixels as {{other}}, labelled "
                                   f"{'; '.join(e.labels)} here: kept as first labelled", first)
                    continue
                seen[digest] = (e.path, labels, e.file or e.path)
                fresh.append((e, r, digest, labels))
            write_chunk(conn, ds.id, fresh, report, changes, ring, scrub, settled, record)
            bar.update(len(batch))
        bar.close()
    relabel_agreed(conn, report, changes, disagree, on_conflict, vocab)
    reports.finish(conn, report, "done", ring, scrub)
    conn.execute("ANALYZE medsim.images")
    report.seconds = time.perf_counter() - t0
    return report


def _files(entries) -> dict[str, list]:
    out: dict[str, list] = {}
    for e in entries:
        out.setdefault(e.file or e.path, []).append(e)
    return out


def _both(hooks, conn, dataset_id, settled) -> None:
    for hook in hooks:
        hook(conn, dataset_id, settled)


def write_chunk(conn, dataset_id: int, fresh: list, report: ArchiveReport, changes: dict, ring, scrub,
                settled: list | None = None, record=None) -> None:
    """One chunk, one transaction: the dataset's row first, then which of the chunk's images
    are stored already (by digest), then the rest by binary COPY, the chunk's findings and
    (``record``) what the source keeps of each entry.
    Two runs of one folder take turns here, and the second finds the first's images."""
    settled = [] if settled is None else settled
    with conn.transaction():
        conn.execute(Q.lock_dataset, {"id": dataset_id})
        fresh = deletion.refuse_withdrawn(conn, fresh, settled, report)  # under the patients' locks
        stored = {s.sha256: s for s in rows(conn, Q.images_with_digests, {
            "dataset_id": dataset_id, "digests": [d for _, _, d, _ in fresh]}, as_=Stored)}
        nxt = {r[0]: r[1] + 1 for r in conn.execute(Q.max_split_index, {"dataset_id": dataset_id})}
        written = 0
        with conn.cursor() as cur, cur.copy(Q.copy_archive_images) as copy:
            copy.set_types(COPY_TYPES)
            for e, loaded, digest, labels in fresh:
                old = stored.get(bytes(digest))
                if old is not None:
                    settled.append((e, old.id, "unchanged" if list(old.labels) == labels else "label_changed", None))
                    if list(old.labels) == labels:
                        report.unchanged += 1
                    else:
                        changes[digest] = (old.id, labels, e.path, list(old.labels))
                    continue
                x = loaded.pixels
                idx = nxt.get(e.split, 0)
                nxt[e.split] = idx + 1
                h, w, c = x.shape
                orig = loaded.original_size or (None, None)
                meta = {k: (ring.uid(v) if k in UID_TAGS else v) for k, v in {**e.metadata, **loaded.metadata}.items()}
                copy.write_row((dataset_id, e.split, idx, labels, h, w, c, images.stored.to_bytes(x), digest,
                                16 if x.dtype.itemsize == 2 else 8, e.patient_key,
                                ring.uid(e.study_id) if e.study_id else None, Jsonb(meta), ring.path(e.path),
                                orig[0], orig[1], perceptual.phash(x)))
                report.per_split[e.split] = report.per_split.get(e.split, 0) + 1
                written += 1
        if record is not None:
            new = [(e, d) for e, _, d, _ in fresh if bytes(d) not in stored]
            ids = {bytes(s.sha256): s.id for s in rows(conn, Q.images_with_digests, {
                "dataset_id": dataset_id, "digests": [d for _, d in new]}, as_=Stored)}
            settled += [(e, ids[bytes(d)], "stored", None) for e, d in new]
            record(conn, dataset_id, settled)
        reports.flush(conn, report, ring, scrub)
    report.added += written


def relabel_agreed(conn, report: ArchiveReport, changes: dict, disagree: set, on_conflict: str, vocab) -> None:
    """Stored pixels that this source labels otherwise: a finding each; applied (relabel)
    only where every file of the source with those pixels agrees."""
    names = {i: n for n, i in vocab.items()}
    with conn.transaction():
        for digest, (image_id, labels, path, old) in changes.items():
            report.label_changes += 1
            agreed = digest not in disagree
            apply = on_conflict == "relabel" and agreed
            verb = ("relabelled" if apply else "kept (the source's files disagree)" if not agreed
                    else "kept (--on-conflict relabel applies it)")
            report.add(path, "label_changed", f"image {image_id} is labelled {_names(old, names)}, the source now "
                       f"says {_names(labels, names)}: {verb}")
            if apply:
                conn.execute(Q.relabel_image, {"id": image_id, "labels": labels})
                report.relabelled += 1


def _names(labels: list, names: dict) -> str:
    if len(labels) > 1 and set(labels) <= {0, 1}:  # a multi-label flag vector
        return "; ".join(names.get(i, str(i)) for i, f in enumerate(labels) if f) or "none"
    return "; ".join(names.get(i, str(i)) for i in labels)


def _scrub(root, text: str, rel: str) -> str:
    """A reason as the database keeps it: without the file's name or any server path."""
    for name in (os.path.join(str(root), rel), str(root), rel):
        if name:
            text = text.replace(name, "<the file>" if name != str(root) else "<the archive>")
    return text


def dataset_for(conn, source, name: str, entries, multi: bool, ring) -> tuple[DatasetRow, dict[str, int]]:
    """The dataset row (created, or checked and its label names extended) -> (row, vocab).
    An archive is its name: a re-run with another --max-side is refused, not a second dataset."""
    found = rows(conn, Q.archive_datasets_named, {"flag": name}, as_=DatasetRow)
    if found and found[0].source_kind == "medmnist":
        raise BadArgument(f"{name} is a MedMNIST dataset; give the archive another --name")
    ds = found[0] if found else None
    names = sorted({n for e in entries for n in e.labels})
    if ds is not None and ds.image_size != source.max_side:
        if source.max_side_given:
            raise DataRefused(f"{name} was ingested with --max-side {ds.image_size}; re-run with that (or without "
                              f"--max-side), or give another --name")
        source.max_side = ds.image_size
    if ds is None:
        label_names = {str(i): n for i, n in enumerate(names)}
        task = "multi-label" if multi else "multi-class"
        with conn.transaction():
            ds_id = scalar(conn, Q.insert_archive_dataset, {
                "flag": name, "size": source.max_side, "task": task, "label_names": json.dumps(label_names),
                "source_file": ring.path(source.describe()), "source_md5": source.fingerprint(),
                "source_kind": source.kind,
                "split_method": json.dumps({"method": "given" if all(e.split for e in entries) else "assigned"})})
        if ds_id is None:  # another run created it a moment ago: use theirs
            return dataset_for(conn, source, name, entries, multi, ring)
        ds = DatasetRow(ds_id, source.kind, label_names, task, source.max_side)
    elif multi and not ds.task.startswith("multi-label"):
        raise DataRefused(f"{name} was ingested with one label per image; this source has several "
                          f"(';' in the label column). Use another --name.")
    with conn.transaction():  # new label names go at the end (existing rows keep their meaning)
        ds.label_names = scalar(conn, Q.lock_dataset, {"id": ds.id})
        vocab = {n: int(i) for i, n in ds.label_names.items()}
        added = [n for n in names if n not in vocab]
        for n in added:
            vocab[n] = len(vocab)
        if added:
            ds.label_names = {str(i): n for n, i in vocab.items()}
            conn.execute(Q.update_label_names, {"id": ds.id, "label_names": json.dumps(ds.label_names)})
    return ds, vocab


def assign_splits(conn, ds: DatasetRow, entries: list[Entry], seed: int, fractions) -> None:
    """Entries without a split get one: a known patient keeps theirs; new patients (or
    single images) are assigned together, grouped and stratified. Deterministic: two runs
    of one source assign the same splits."""
    if all(e.split for e in entries):
        return
    if any(e.split for e in entries):
        raise DataRefused("the manifest gives a split for some rows and not for others: give it for all, or drop "
                          "the column so medsim assigns splits grouped by patient")
    patients = dict(conn.execute(Q.dataset_patients, {"dataset_id": ds.id}).fetchall())
    groups = {}
    for e in entries:
        if e.patient_key in patients:
            e.split = patients[e.patient_key]
        else:
            groups.setdefault(e.patient_key or f"image:{e.path}", []).append(tuple(e.labels))
    chosen = splitting.assign(groups, seed, fractions)
    for e in entries:
        if e.split is None:
            e.split = chosen[e.patient_key or f"image:{e.path}"]
    with conn.transaction():
        conn.execute(Q.set_split_method, {"id": ds.id, "split_method": json.dumps(
            {"method": "grouped-stratified", "group": "patient", "stratify": "label", "seed": seed,
             "fractions": [round(f, 6) for f in fractions]})})
