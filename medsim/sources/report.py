"""An archive ingest's report: what was added, what was already there, and every file that
could not be used, in medsim.ingest_reports / medsim.ingest_problems.

What a person sees (printed) names files in clear; what the database keeps names them by
their keyed hash (sources/keys.py) and carries no server path, so neither a pg_dump nor the
read-only role learns a file name. A run holds a session lock on its report while it runs:
a later ingest finds the reports whose runs died (SIGKILL, a lost machine) and marks them
'interrupted' instead of leaving them 'running' for ever.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from medsim.queries import Q, scalar

# What medsim.ingest_problems.kind accepts (its CHECK constraint). A decoder's note (what a C
# decoder printed while reading a file it did decode) is printed with the report until the
# schema takes it too.
STORED_KINDS = ("skipped", "duplicate", "label_changed", "label_conflict")


@dataclass
class Finding:
    path: str  # the file (or frame), relative to the archive, in clear
    kind: str  # skipped, duplicate, label_changed, label_conflict; decoder (printed only: STORED_KINDS)
    reason: str  # may name another file as {other}
    other: str | None = None

    def text(self) -> str:
        return self.reason.format(other=self.other)

    def __iter__(self):  # reads as (path, kind, reason), the way reports were lists of tuples
        return iter((self.path, self.kind, self.text()))


@dataclass
class ArchiveReport:
    dataset: str
    dataset_id: int
    report_id: int
    listed: int = 0
    unchanged_files: int = 0  # settled by an earlier run and unchanged since: not read (ledger.py)
    added: int = 0
    unchanged: int = 0  # already in the dataset with the same labels (a re-run, or a concurrent run)
    duplicates: int = 0  # the same pixels and labels as another file of this run
    skipped: int = 0
    label_changes: int = 0  # the source, unanimous, labels stored pixels differently
    relabelled: int = 0
    label_conflicts: int = 0  # the source gives the same pixels several labels
    seconds: float = 0.0
    per_split: dict = field(default_factory=dict)
    problems: list = field(default_factory=list)  # Finding
    flushed: int = 0  # how many of the problems are in medsim.ingest_problems already

    def add(self, path: str, kind: str, reason: str, other: str | None = None) -> None:
        self.problems.append(Finding(path, kind, reason, other))

    def lines(self, limit: int = 20) -> list[str]:
        rate = self.added / self.seconds if self.seconds else 0.0
        out = [f"{self.dataset}: {self.added} images added, {self.unchanged} already there, "
               f"{self.duplicates} duplicate(s), {self.skipped} skipped, {self.label_changes} label change(s)"
               f"{f' ({self.relabelled} applied)' if self.relabelled else ''}, {self.label_conflicts} label "
               f"conflict(s); {self.seconds:.1f}s ({rate:,.0f} images/s); report {self.report_id}"]
        if self.unchanged_files:
            out.append(f"  {self.unchanged_files} file(s) unchanged since an earlier run: not read again "
                       f"(--recheck reads them)")
        out += [f"  {p.kind}: {p.path}: {p.text()}" for p in self.problems[:limit]]
        if len(self.problems) > limit:
            out.append(f"  ... {len(self.problems) - limit} more: SELECT * FROM medsim.ingest_problems "
                       f"WHERE report_id = {self.report_id}  (files by their keyed hash: medsim keys hash --path)")
        return out


def open_report(conn, dataset_id: int, source: str, options: str) -> int:
    """The run's report row, and the session lock that says the run is alive."""
    with conn.transaction():
        report_id = scalar(conn, Q.insert_ingest_report, {"dataset_id": dataset_id, "source": source,
                                                           "options": options})
    conn.execute(Q.hold_ingest_report, {"id": report_id})
    return report_id


def mark_interrupted(conn) -> int:
    """Reports still 'running' whose run holds no lock any more -> marked 'interrupted'."""
    return len(conn.execute(Q.interrupted_ingest_reports).fetchall())


def flush(conn, report: ArchiveReport, ring, scrub) -> None:
    """Write the findings not written yet (inside the caller's transaction): the file by its
    keyed hash, the reason with file names and server paths taken out (scrub)."""
    for p in report.problems[report.flushed:]:
        if p.kind not in STORED_KINDS:
            continue
        other = ring.path(p.other) if p.other else None
        conn.execute(Q.insert_ingest_problem, {"report_id": report.report_id, "path": ring.path(p.path),
                                               "kind": p.kind, "reason": scrub(p.reason.format(other=other), p.path)})
    report.flushed = len(report.problems)


def finish(conn, report: ArchiveReport, status: str, ring, scrub) -> None:
    with conn.transaction():
        flush(conn, report, ring, scrub)
        report.skipped = sum(1 for p in report.problems if p.kind == "skipped")
        conn.execute(Q.finish_ingest_report, {
            "id": report.report_id, "status": status, "added": report.added, "duplicates": report.duplicates,
            "skipped": report.skipped, "label_changes": report.label_changes, "relabelled": report.relabelled,
            "label_conflicts": report.label_conflicts})
        conn.execute(Q.update_n_samples, {"id": report.dataset_id})
    conn.execute(Q.release_ingest_report, {"id": report.report_id})
