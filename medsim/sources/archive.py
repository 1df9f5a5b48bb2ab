"""Ingest an archive (a folder, a DICOM export) into medsim.datasets / medsim.images.

The guarantees are MedMNIST's: Postgres holds everything, nothing is half-written, bad
input gets a clear reason. What differs is that an archive is large, grows and is messy:
- it is written in chunks, each its own transaction, so a crash loses at most the chunk
  in flight, and a re-run adds only what is not there yet (content sha256 per dataset);
- a file that cannot be read is skipped and reported (printed, and kept in
  medsim.ingest_problems); --strict reads everything first and refuses the whole archive
  if anything is wrong;
- a changed label for the same pixels is reported, and applied only with relabel=True;
- without a split from the source, splits are assigned (sources/splits.py) grouped by
  patient and stratified by label, and an already-known patient keeps their split.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial

from psycopg.types.json import Jsonb

from medsim import images
from medsim.errors import BadArgument, DataRefused, Unreadable
from medsim.queries import Q, one, rows, scalar
from medsim.sources import splits as splitting
from medsim.sources.base import Entry, patient_hasher

CHUNK = 500
COPY_TYPES = ["int4", "text", "int4", "int2[]", "int4", "int4", "int2", "bytea", "bytea", "int2", "text",
              "text", "jsonb", "text", "int4", "int4"]


@dataclass
class ArchiveReport:
    dataset: str
    dataset_id: int
    report_id: int
    listed: int = 0
    added: int = 0
    unchanged: int = 0  # already in the dataset with the same labels (a re-run)
    duplicates: int = 0  # the same pixels as another file of this run
    skipped: int = 0
    label_changes: int = 0
    relabelled: int = 0
    seconds: float = 0.0
    per_split: dict = field(default_factory=dict)
    problems: list = field(default_factory=list)  # (path, kind, reason)
    flushed: int = 0  # how many of the problems are in medsim.ingest_problems already

    def lines(self, limit: int = 20) -> list[str]:
        rate = self.added / self.seconds if self.seconds else 0.0
        out = [f"{self.dataset}: {self.added} images added, {self.unchanged} already there, "
               f"{self.duplicates} duplicate(s), {self.skipped} skipped, {self.label_changes} label change(s)"
               f"{f' ({self.relabelled} applied)' if self.relabelled else ''}; {self.seconds:.1f}s "
               f"({rate:,.0f} images/s); report {self.report_id}"]
        out += [f"  {kind}: {path}: {reason}" for path, kind, reason in self.problems[:limit]]
        if len(self.problems) > limit:
            out.append(f"  ... {len(self.problems) - limit} more: SELECT * FROM medsim.ingest_problems "
                       f"WHERE report_id = {self.report_id}")
        return out


def load_entry(loader, e: Entry):
    """-> (entry, Loaded or Unreadable); module-level so worker processes can run it."""
    try:
        return e, loader(e)
    except Unreadable as err:
        return e, err


class InlinePool:
    """The pool interface without processes, for small archives."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def map(self, fn, items, chunksize=1):
        return map(fn, items)


@dataclass
class DatasetRow:
    id: int
    source_kind: str
    label_names: dict
    task: str


@dataclass
class Known:
    id: int
    sha256: bytes
    labels: list
    split: str
    patient_key: str | None


def label_vector(names: tuple, vocab: dict[str, int], multi: bool) -> list[int]:
    if multi:
        flags = [0] * len(vocab)
        for n in names:
            flags[vocab[n]] = 1
        return flags
    return [vocab[names[0]]]


def ingest_archive(conn, source, name: str, *, strict: bool = False, relabel: bool = False, seed: int = 0,
                   fractions=splitting.DEFAULT_FRACTIONS, progress: bool = True, workers: int | None = None,
                   chunk: int = CHUNK) -> ArchiveReport:
    """Load every usable image of `source` into the dataset `name` (created if new)."""
    t0 = time.perf_counter()
    workers = workers if workers is not None else (os.cpu_count() or 1)
    entries, listing_problems = source.entries()
    keyed = patient_hasher() if any(e.patient_id for e in entries) else None
    for e in entries:
        e.patient_key = keyed(e.patient_id) if keyed and e.patient_id else None
    multi = any(len(e.labels) > 1 for e in entries)
    with conn.transaction():
        ds, vocab = dataset_for(conn, source, name, entries, multi)
        report_id = scalar(conn, Q.insert_ingest_report, {"dataset_id": ds.id, "source": source.describe(),
                                                           "options": json.dumps({"strict": strict, "relabel": relabel,
                                                                                  "seed": seed,
                                                                                  "fractions": list(fractions),
                                                                                  "max_side": source.max_side})})
    report = ArchiveReport(name, ds.id, report_id, listed=len(entries))
    for path, reason in listing_problems:
        report.problems.append((path, "skipped", reason))
    multi = ds.task.startswith("multi-label")
    known = {k.sha256: k for k in rows(conn, Q.dataset_images, {"dataset_id": ds.id}, as_=Known)}
    assign_splits(conn, ds, entries, known, seed, fractions)

    load = partial(load_entry, source.loader())
    # Decoding runs in worker processes, one per core: Pillow's per-file Python overhead
    # holds the GIL, and threads gave 2,900 images/s on 2 cores where processes keep both
    # busy. A small archive is not worth starting them for.
    pool = ProcessPoolExecutor(workers) if workers > 1 and len(entries) >= 500 else InlinePool()
    with pool:
        if strict:
            unreadable = [(e.path, str(r)) for e, r in pool.map(load, entries, chunksize=64)
                          if isinstance(r, Unreadable)]
            bad = listing_problems + unreadable  # the listing's are in the report already
            if bad:
                finish(conn, report, "refused", [(p, "skipped", why) for p, why in unreadable])
                raise DataRefused(f"{source.describe()}: {len(bad)} file(s) cannot be used (first: {bad[0][0]}: "
                                  f"{bad[0][1]}); nothing was ingested (--strict). Report {report.report_id}.")
        from tqdm import tqdm

        bar = tqdm(total=len(entries), unit="img", desc=f"ingest {name}", disable=not progress, leave=False)
        seen = {}
        for start in range(0, len(entries), chunk):
            batch = list(pool.map(load, entries[start : start + chunk], chunksize=32))
            new = []
            for e, r in batch:
                if isinstance(r, Unreadable):
                    report.problems.append((e.path, "skipped", str(r)))
                    continue
                x = r.pixels
                digest = hashlib.sha256(x.tobytes()).digest()
                labels = label_vector(e.labels, vocab, multi)
                if digest in known:
                    k = known[digest]
                    if list(k.labels) == labels:
                        report.unchanged += 1
                    else:
                        report.label_changes += 1
                        verb = "relabelled" if relabel else "kept (pass --relabel to apply)"
                        report.problems.append((e.path, "label_changed", f"image {k.id} is labelled {k.labels}, "
                                                f"the source now says {labels} ({'; '.join(e.labels)}): {verb}"))
                        if relabel:
                            conn.execute(Q.relabel_image, {"id": k.id, "labels": labels})
                            report.relabelled += 1
                    continue
                if digest in seen:
                    report.duplicates += 1
                    report.problems.append((e.path, "duplicate", f"the same pixels as {seen[digest]}"))
                    continue
                seen[digest] = e.path
                new.append((e, r, digest, labels))
            write_chunk(conn, ds.id, new, report)
            bar.update(len(batch))
        bar.close()
    finish(conn, report, "done", [])
    conn.execute("ANALYZE medsim.images")
    report.seconds = time.perf_counter() - t0
    return report


def dataset_for(conn, source, name: str, entries, multi: bool) -> tuple[DatasetRow, dict[str, int]]:
    """The dataset row (created, or checked and its label names extended) -> (row, vocab)."""
    ds = one(conn, Q.archive_dataset, {"flag": name, "size": source.max_side}, as_=DatasetRow)
    names = sorted({n for e in entries for n in e.labels})
    if ds is None:
        label_names = {str(i): n for i, n in enumerate(names)}
        task = "multi-label" if multi else "multi-class"
        ds_id = scalar(conn, Q.insert_archive_dataset, {
            "flag": name, "size": source.max_side, "task": task, "label_names": json.dumps(label_names),
            "source_file": source.describe(), "source_md5": source.fingerprint(), "source_kind": source.kind,
            "split_method": json.dumps({"method": "given" if all(e.split for e in entries) else "assigned"})})
        ds = DatasetRow(ds_id, source.kind, label_names, task)
    elif ds.source_kind == "medmnist":
        raise BadArgument(f"{name} is a MedMNIST dataset; give the archive another --name")
    elif multi and not ds.task.startswith("multi-label"):
        raise DataRefused(f"{name} was ingested with one label per image; this source has several "
                          f"(';' in the label column). Use another --name.")
    vocab = {n: int(i) for i, n in ds.label_names.items()}
    added = [n for n in names if n not in vocab]
    if added:  # new label names go at the end: existing rows keep their meaning
        for n in added:
            vocab[n] = len(vocab)
        ds.label_names = {str(i): n for n, i in vocab.items()}
        conn.execute(Q.update_label_names, {"id": ds.id, "label_names": json.dumps(ds.label_names)})
    return ds, vocab


def assign_splits(conn, ds: DatasetRow, entries: list[Entry], known: dict, seed: int, fractions) -> None:
    """Entries without a split get one: a known patient keeps theirs; new patients (or
    single images) are assigned together, grouped and stratified."""
    if all(e.split for e in entries):
        return
    if any(e.split for e in entries):
        raise DataRefused("the manifest gives a split for some rows and not for others: give it for all, or drop "
                          "the column so medsim assigns splits grouped by patient")
    patients = {k.patient_key: k.split for k in known.values() if k.patient_key}
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
    conn.execute(Q.set_split_method, {"id": ds.id, "split_method": json.dumps(
        {"method": "grouped-stratified", "group": "patient", "stratify": "label", "seed": seed,
         "fractions": [round(f, 6) for f in fractions]})})


def write_chunk(conn, dataset_id: int, new: list, report: ArchiveReport) -> None:
    """One chunk, one transaction. The dataset row is locked first, so two ingests into
    the same dataset take turns (split indexes are read under the lock), and a crash
    rolls back only this chunk."""
    with conn.transaction():
        conn.execute(Q.lock_dataset, {"id": dataset_id})
        nxt = {r[0]: r[1] + 1 for r in conn.execute(Q.max_split_index, {"dataset_id": dataset_id})}
        with conn.cursor() as cur, cur.copy(Q.copy_archive_images) as copy:
            copy.set_types(COPY_TYPES)
            for e, loaded, digest, labels in new:
                x = loaded.pixels
                idx = nxt.get(e.split, 0)
                nxt[e.split] = idx + 1
                h, w, c = x.shape
                orig = loaded.original_size or (None, None)
                copy.write_row((dataset_id, e.split, idx, labels, h, w, c, images.stored.to_bytes(x),
                                digest, 16 if x.dtype.itemsize == 2 else 8, e.patient_key, e.study_id,
                                Jsonb({**e.metadata, **loaded.metadata}), e.path, orig[0], orig[1]))
                report.per_split[e.split] = report.per_split.get(e.split, 0) + 1
        flush_problems(conn, report)
    report.added += len(new)


def flush_problems(conn, report: ArchiveReport) -> None:
    for path, kind, reason in report.problems[report.flushed:]:
        conn.execute(Q.insert_ingest_problem, {"report_id": report.report_id, "path": path, "kind": kind,
                                               "reason": reason})
    report.flushed = len(report.problems)


def finish(conn, report: ArchiveReport, status: str, problems: list) -> None:
    with conn.transaction():
        report.problems += problems
        flush_problems(conn, report)
        report.skipped = sum(1 for _, kind, _ in report.problems if kind == "skipped")
        conn.execute(Q.finish_ingest_report, {
            "id": report.report_id, "status": status, "added": report.added, "duplicates": report.duplicates,
            "skipped": report.skipped, "label_changes": report.label_changes, "relabelled": report.relabelled})
        conn.execute(Q.update_n_samples, {"id": report.dataset_id})
