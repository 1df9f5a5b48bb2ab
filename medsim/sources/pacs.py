"""An archive kept in sync with a PACS over DICOMweb (`medsim sync URL --name NAME`).

What a sync does, in order:
1. finds the instances to look at: on the first run (or --full) every instance QIDO-RS lists
   under the filters; later runs only what is new since the source's cursor: Orthanc's
   change log sequence when the server is an Orthanc, else the last study date seen;
2. leaves out, without fetching, every instance already settled (medsim.pacs_instances,
   whatever became of it) and every instance of a patient deleted from medsim: a withdrawn
   patient's studies are not fetched back by the next cron run;
3. refuses, without fetching, what QIDO already says is not an image to search (a SOP
   class of masks, doses, reports) or is over MEDSIM_MAX_IMAGE_PIXELS;
4. fetches the rest by WADO-RS and stores them through the archive ingest (sources/
   archive.py: the same DICOM rendering as ingest-folder, keyed patients, splits grouped by
   patient, one transaction per chunk, which refuses the images of a patient deleted since
   the listing: deletion.py). Postgres keeps the rendition at --max-side (256 by default:
   model size, not the full DICOM) and, per instance, its UIDs for the way back (a withdrawn
   patient's only as keyed hashes);
5. moves the cursor only when nothing failed, so a sync that stopped (PACS down) or
   skipped instances (5xx, timeouts) is simply run again and picks up where it was.
--prune removes, through the deletion path, images whose instances the PACS no longer has.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import date
from functools import partial

from medsim.errors import BadArgument, DataRefused, PacsUnavailable
from medsim.queries import Q, scalar
from medsim.sources import deletion, keys
from medsim.sources.archive import ingest_archive
from medsim.sources.pacs_client import (
    FIELDS,
    FetchFailed,
    Server,
    changes,
    last_change,
    orthanc_root,
    orthanc_study_id,
    orthanc_uids,
)
from medsim.sources.pacs_source import Item, PacsSource, listed
from medsim.sources.report import ArchiveReport

VIEWERS = {  # presets for --viewer; {root} is the PACS's REST root (the DICOMweb URL without /dicom-web)
    "orthanc": "{root}/app/explorer.html#study?uuid={orthanc_study}",
    "orthanc-explorer-2": "{root}/ui/app/#/filtered-studies?StudyInstanceUID={study}&expand=study",
    "stone": "{root}/stone-webviewer/index.html?study={study}",
}


@dataclass
class SyncReport:
    name: str
    url: str
    mode: str  # "full", "changes since N", "studies since DATE"
    listed: int = 0  # instances (frames) the PACS listed for this run
    known: int = 0  # already settled: not fetched
    withdrawn: int = 0  # of deleted patients: not fetched
    archive: ArchiveReport | None = None
    unsettled: int = 0  # fetch failures this run: tried again next time
    pruned: int = 0
    cursor: dict = field(default_factory=dict)
    seconds: float = 0.0

    def lines(self) -> list[str]:
        a = self.archive
        out = [f"{self.name}: synced from {self.url} ({self.mode}) in {self.seconds:.1f}s: {self.listed} listed, "
               f"{self.known} already settled, {self.withdrawn} of deleted patients left in the PACS, "
               f"{a.added if a else 0} added, {a.skipped if a else 0} skipped, {self.pruned} pruned"]
        if self.unsettled:
            out.append(f"{self.unsettled} instance(s) could not be fetched this time: the next sync tries them "
                       f"again (the cursor did not move)")
        return out


def sync(conn, url: str, name: str, *, label_tag: str, filters: dict | None = None, studies=(), limit=None,
         full: bool = False, prune: bool = False, viewer: str | None = None, max_side: int | None = None,
         progress: bool = False, workers: int | None = None, chunk: int | None = None) -> SyncReport:
    t0 = time.perf_counter()
    if not label_tag:
        raise BadArgument("give --label-tag: the DICOM attribute whose value is an image's label "
                          "(StudyDescription, BodyPartExamined, ...)")
    server = Server.at(url)
    ring = keys.keyring(conn, "a PACS's patient ids and UIDs can name a person")
    lock = scalar(conn, Q.pacs_try_lock, {"key": f"{name}\n{server.url}"})
    if not lock:
        raise DataRefused(f"another sync of {name} from {server.url} is running; try again when it ends")
    try:
        src = conn.execute(Q.pacs_source, {"name": name, "url": server.url}).fetchone()
        cursor = (src[1] or {}) if src and not full else {}
        root = orthanc_root(server)
        template = _viewer(viewer, root)
        report = SyncReport(name, server.url, "full")
        filters = dict(filters or {})
        raw, mark = _listing(server, root, cursor, filters, list(studies), limit, label_tag, report)
        items = listed(raw, label_tag)
        report.listed = len(items)
        per_series = Counter((study, series) for study, series, _ in {(i.study, i.series, i.sop) for i in items})
        items = _not_settled(conn, src[0] if src else None, items, ring, report)
        source = PacsSource(server, items, label_tag, max_side, per_series)
        unsettled: list = []  # fetches that failed this time (_record counts them)
        recorder = partial(_record, server.url, root is not None, template, {
            (i.sop, i.frame or 0): orthanc_study_id(i.patient_id or "", i.study) for i in items}, unsettled, ring)
        try:
            if items:
                report.archive = ingest_archive(conn, source, name, progress=progress, workers=workers,
                                                record=recorder, **({"chunk": chunk} if chunk else {}))
        except PacsUnavailable as err:
            raise PacsUnavailable(f"{err}. The sync stopped; what it stored is kept, and the next sync resumes "
                                  f"from there") from None
        report.unsettled = len(unsettled)
        sid = scalar(conn, Q.pacs_source, {"name": name, "url": server.url})
        if sid is None and (report.archive is not None or prune):  # nothing new at all: the row still records us
            with conn.transaction():
                sid = _source_row(conn, name, server.url, root is not None, template)
        if sid is not None:
            with conn.transaction():
                if viewer:
                    conn.execute(Q.pacs_set_viewer, {"id": sid, "viewer": template})
                if not report.unsettled and mark:
                    conn.execute(Q.pacs_set_cursor, {"id": sid, "cursor": json.dumps(mark)})
                    report.cursor = mark
            if prune:
                report.pruned = _prune(conn, server, sid, name, ring)
    finally:
        conn.execute(Q.pacs_unlock, {"key": f"{name}\n{server.url}"})
    report.seconds = time.perf_counter() - t0
    return report


def _listing(server: Server, root, cursor: dict, filters: dict, studies: list, limit, label_tag, report):
    """-> (QIDO objects to look at, the cursor to keep if the sync completes)."""
    fields = (*FIELDS, label_tag)
    if root is not None and "changes" in cursor:
        ids, last = changes(server, int(cursor["changes"]))
        report.mode = f"changes since {cursor['changes']}"
        touched = set()
        for i in ids:
            uids = orthanc_uids(server, i)
            if uids and (not studies or uids[0] in studies):
                touched.add(uids[0])
        raw = [obj for s in sorted(touched) for obj in server.instances({**filters, "StudyInstanceUID": s}, fields)]
        return raw, {"changes": last}
    mark = {"changes": last_change(server)} if root is not None else None  # read before listing: nothing slips
    if root is None and "study_date" in cursor:
        report.mode = f"studies since {cursor['study_date']}"
        filters = {**filters, "StudyDate": f"{cursor['study_date']}-"}
    if studies:
        raw = [obj for s in studies for obj in server.instances({**filters, "StudyInstanceUID": s}, fields, limit)]
    else:
        raw = server.instances(filters, fields, limit)
    if mark is None:
        dates = [o.get("00080020", {}).get("Value", [None])[0] for o in raw]
        seen = max([d for d in dates if d] + [cursor.get("study_date", "")])
        mark = {"study_date": seen or date.today().strftime("%Y%m%d")}
    if limit is not None:
        mark = None  # a limited run has not seen everything: the cursor stays
    return raw, mark


def _not_settled(conn, source_id, items: list[Item], ring, report: SyncReport) -> list[Item]:
    """A listed instance is settled under its UID in clear, or, once its patient was deleted,
    under its keyed hash (deletion.hashed_uid)."""
    settled = set()
    if source_id is not None:
        hashed = {deletion.hashed_uid(ring, sop): sop for sop in {i.sop for i in items}}
        settled = {(hashed.get(r[0], r[0]), r[1]) for r in conn.execute(Q.pacs_settled, {
            "source_id": source_id, "sops": sorted({i.sop for i in items} | set(hashed))})}
    withdrawn = {r[0] for r in conn.execute(Q.deleted_patients)}
    out = []
    for it in items:
        if (it.sop, it.frame or 0) in settled:
            report.known += 1
        elif it.patient_id and ring.patient(it.patient_id) in withdrawn:
            report.withdrawn += 1
        else:
            out.append(it)
    return out


def _record(url: str, is_orthanc: bool, viewer: str | None, orthanc_ids: dict, unsettled: list, ring, conn,
            dataset_id: int, settled: list) -> None:
    """Inside each chunk's transaction: what became of each instance (ingest_archive's hook).
    A fetch that failed this time is not settled: the next sync tries it again. An instance
    of a withdrawn patient (refused in this transaction, deletion.refuse_withdrawn) is settled
    by the keyed hashes of its UIDs, as their deletion left the others."""
    sid = _source_row(conn, None, url, is_orthanc, viewer, dataset_id)
    for e, image_id, outcome, reason in settled:
        if outcome == "refused" and isinstance(reason, FetchFailed):
            unsettled.append(e.path)
            continue
        if outcome == "label_conflict":  # the reason is the first file's key: say it as a duplicate does
            outcome, reason = "duplicate", f"the same pixels as {reason}, labelled otherwise"
        outcome = "unchanged" if outcome == "label_changed" else outcome
        study, series, sop = (e.metadata[t] for t in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))
        orthanc_study = orthanc_ids.get((sop, e.frame or 0))
        if isinstance(reason, deletion.Withdrawn):
            study, series, sop = (deletion.hashed_uid(ring, u) for u in (study, series, sop))
            orthanc_study = None
        conn.execute(Q.pacs_settle, {"source_id": sid, "study": study, "series": series, "sop": sop,
                                     "frame": e.frame or 0, "image_id": image_id, "outcome": outcome,
                                     "reason": str(reason) if reason is not None else None,
                                     "orthanc_study": orthanc_study})


def _source_row(conn, name, url, is_orthanc, viewer, dataset_id=None) -> int:
    if dataset_id is None:
        dataset_id = scalar(conn, Q.pacs_dataset_id, {"name": name})
        if dataset_id is None:
            raise DataRefused(f"no dataset named {name!r} yet: a first sync that stores nothing creates none")
    return scalar(conn, Q.pacs_upsert_source, {"dataset_id": dataset_id, "url": url, "is_orthanc": is_orthanc,
                                               "viewer": viewer})


def _viewer(viewer: str | None, root: str | None) -> str | None:
    """A preset's template or the one given; by default Orthanc's own explorer on an Orthanc."""
    template = VIEWERS.get(viewer or "", viewer) if viewer else (VIEWERS["orthanc"] if root else None)
    if template and "{" not in template:
        raise BadArgument(f"--viewer {viewer!r} is neither a preset ({', '.join(VIEWERS)}) nor a URL template "
                          f"with {{study}} in it")
    return template.replace("{root}", root or "{root}") if template else None


def _prune(conn, server: Server, source_id: int, name: str, ring) -> int:
    """Images whose instance the PACS no longer lists go, through the deletion path."""
    present = {o["00080018"]["Value"][0] for o in server.instances({}, ("SOPInstanceUID",))
               if o.get("00080018", {}).get("Value")}
    present |= {deletion.hashed_uid(ring, sop) for sop in present}  # a withdrawn patient's, kept hashed
    stored = conn.execute(Q.pacs_stored_sops, {"source_id": source_id}).fetchall()
    if not present and stored:
        raise DataRefused(f"the PACS lists no instances at all; refusing to prune every image of {name} "
                          f"(check the URL and the PACS)")
    gone = sorted({sop for sop, _ in stored if sop not in present})
    ids = sorted({i for sop, i in stored if sop in set(gone) and i is not None})
    with conn.transaction():
        if ids:
            deletion.delete(conn, image_ids=ids, reason=f"deleted in the PACS ({server.url})")
        conn.execute(Q.pacs_forget, {"source_id": source_id, "sops": gone})
    return len(ids)

