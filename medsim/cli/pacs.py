"""`medsim sync URL`: keep an archive in sync with a PACS over DICOMweb (sources/pacs.py)."""

from __future__ import annotations

import time

from medsim.cli.common import QUIET, connect

WATCH_MIN_S = 5


def cmd_sync(args) -> int:
    from medsim.sources import pacs

    filters = {}
    if args.modality:
        filters["ModalitiesInStudy"] = args.modality
    if args.since or args.until:
        filters["StudyDate"] = f"{_date(args.since)}-{_date(args.until)}"
    while True:
        with connect(args) as conn:
            report = pacs.sync(conn, args.url, args.name, label_tag=args.label_tag, filters=filters,
                               studies=args.study or (), limit=args.limit, full=args.full, prune=args.prune,
                               viewer=args.viewer, max_side=args.max_side, progress=not args.quiet)
        print("\n".join(report.lines()), flush=True)
        for line in report.archive.lines()[1:] if report.archive is not None else ():
            print("  " + line, flush=True)
        if not args.watch:
            return 0
        time.sleep(max(args.watch, WATCH_MIN_S))


def _date(text: str | None) -> str:
    return (text or "").replace("-", "")


def register(sub) -> None:
    s = sub.add_parser(
        "sync", parents=[QUIET], help="keep an archive in sync with a PACS over DICOMweb (QIDO-RS, WADO-RS)",
        description="Finds instances by QIDO-RS, fetches new ones by WADO-RS and stores them as `ingest-folder` "
                    "stores DICOM files (keyed patients, splits grouped by patient). Later runs fetch only what is "
                    "new: Orthanc's change log on an Orthanc, else studies since the last study date seen. "
                    "Credentials come from MEDSIM_PACS_USER / MEDSIM_PACS_PASSWORD or MEDSIM_PACS_TOKEN and are "
                    "never stored.")
    s.add_argument("url", metavar="URL", help="the DICOMweb root, e.g. http://pacs:8042/dicom-web")
    s.add_argument("--name", required=True, help="the dataset's name in medsim")
    s.add_argument("--label-tag", required=True, metavar="TAG",
                   help="the DICOM attribute whose value labels an image (StudyDescription, BodyPartExamined, ...)")
    s.add_argument("--since", default=None, metavar="YYYY-MM-DD", help="studies from this date on")
    s.add_argument("--until", default=None, metavar="YYYY-MM-DD", help="studies up to this date")
    s.add_argument("--modality", default=None, help="studies with this modality (CT, CR, US, ...)")
    s.add_argument("--study", nargs="+", default=None, metavar="UID", help="only these StudyInstanceUIDs")
    s.add_argument("--limit", type=int, default=None, help="at most this many instances (the cursor stays put)")
    s.add_argument("--full", action="store_true",
                   help="list everything again instead of what is new since the last sync (settled instances are "
                        "still not fetched again); on a server other than Orthanc, run it now and then as well: a study "
                        "that arrives dated before the last one seen is not listed incrementally")
    s.add_argument("--prune", action="store_true",
                   help="delete images whose instances the PACS no longer has (through `medsim delete`'s path)")
    s.add_argument("--viewer", default=None, metavar="PRESET|TEMPLATE",
                   help="the results' link to the PACS's viewer: orthanc (default on an Orthanc), "
                        "orthanc-explorer-2, stone, or a template such as "
                        "'https://ohif.example/viewer?StudyInstanceUIDs={study}' ({study}, {series}, {sop}, {root})")
    s.add_argument("--max-side", type=int, default=None,
                   help="the rendition Postgres keeps (default 256: model size; the original stays in the PACS)")
    s.add_argument("--watch", type=int, default=None, metavar="SECONDS",
                   help="sync again every SECONDS until interrupted")
    s.set_defaults(func=cmd_sync)
