"""Commands about the data itself: the database (db, psql, migrate), getting images in
(ingest, ingest-folder), taking them out (delete), and the leakage audit."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from medsim import db
from medsim.cli.common import DATA, MODEL, QUIET, connect
from medsim.errors import BadArgument, MedsimError


def cmd_db(args) -> int:
    if args.action == "start":
        url = db.database_url(start=True)
        print(f"running ({db.source()}): {url}")
    elif args.action == "stop":
        print("stopped" if db.embedded_stop() else "not running")
    elif args.action == "status":
        url = db.embedded_url()
        print(f"embedded: {'running at ' + url if url else 'not running'} (data: {db.pgdata_dir()})")
        print(f"medsim uses: {db.source()}")
    elif args.action == "url":
        print(db.database_url(start=True))
    else:
        if args.file is None:
            raise BadArgument(f"medsim db {args.action} needs a FILE")
        url = args.database_url or db.database_url()
        if args.action == "backup":
            db.backup(url, Path(args.file))
            print(f"backup written to {args.file} (pg_dump custom format; restore with `medsim db restore {args.file}`)")
        else:
            db.restore(url, Path(args.file))
            print(f"restored {args.file}")
    return 0


def cmd_psql(args) -> int:
    """psql on the database medsim uses (the embedded server's own psql binary)."""
    url = args.database_url or db.database_url()
    psql = db.pg_tool("psql")
    os.execv(psql, [psql, url, *args.extra])


def cmd_migrate(args) -> int:
    from alembic.util import CommandError

    from medsim import migrate

    url = args.database_url or db.database_url()
    try:
        migrate.upgrade(url, args.revision, lock_wait_s=args.lock_wait)
    except CommandError as err:  # unknown or ambiguous revision
        raise BadArgument(f"migrate: {err}") from None
    at = migrate.current(url)
    print(f"database at revision {at}")
    if at == migrate.HEAD:
        rehash(url)
        waiting(url)
    return 0


def rehash(url: str) -> None:
    """Revision 0021's perceptual hashes for the rows stored before it (a revision cannot
    compute them: they need the one image path); a second run finds none left."""
    from medsim.sources import ingest

    with db.connect(url, autocommit=True) as conn:
        n = ingest.backfill_phashes(conn)
    if n:
        print(f"perceptual hashes computed for {n:,} images stored before revision 0021 (a copy of one at "
              f"another size is now recognised as that image)")


def waiting(url: str) -> None:
    """A revision may delete embeddings (0014 re-embeds what the one image path changed):
    say what now waits for the worker, or searches silently miss it."""
    from medsim import queue

    with db.connect(url, autocommit=True) as conn:
        rows = [r for r in queue.status(conn) if r.is_current]
    n = sum(r.total - r.embedded for r in rows)
    if n:
        total = sum(r.total for r in rows)
        print(f"{n:,} of {total:,} images have no embedding for the current model {rows[0].model_id} "
              f"({rows[0].model_name}) and are left out of searches until `medsim worker` embeds them")


def cmd_ingest(args) -> int:
    from medsim.sources import ingest

    refused = None  # the last subset's MedsimError: the exit code of the family (2)
    with connect(args) as conn:
        for flag in args.flags:
            try:
                r = ingest.ingest(conn, flag, size=args.size, data_dir=args.data_dir,
                                  accept_unofficial=args.accept_unofficial, allow_download=not args.no_download,
                                  show_progress=not args.quiet)
                print(r.line())
            except MedsimError as err:  # one subset's problem; the others still load
                refused = err
                print(f"{flag}: NOT ingested: {err}", file=sys.stderr)
        for c in ingest.summary(conn, args.flags, args.size):
            print(f"  {c.flag:16s} {c.split:5s} {c.n:7d}{'' if c.md5_official else '  (unofficial file)'}")
    return refused.exit_code if refused else 0


def cmd_ingest_folder(args) -> int:
    from medsim.sources import archive, splits
    from medsim.sources.folder import FolderSource

    source = FolderSource(args.path, manifest=args.manifest, max_side=args.max_side, label_tag=args.label_tag,
                          follow_links=args.follow_links)
    fractions = splits.parse_fractions(args.split_fractions)
    on_conflict = "relabel" if args.relabel else args.on_conflict
    with connect(args) as conn:
        report = archive.ingest_archive(conn, source, args.name, strict=args.strict, on_conflict=on_conflict,
                                        seed=args.seed, fractions=fractions, progress=not args.quiet,
                                        recheck=args.recheck)
    print("\n".join(report.lines()))
    for split in ("train", "val", "test"):
        if report.per_split.get(split):
            print(f"  {split:5s} {report.per_split[split]:7d} added")
    return 0


def cmd_delete(args) -> int:
    from medsim.search import faiss_index
    from medsim.sources import deletion

    with connect(args) as conn:
        d = deletion.delete(conn, dataset=args.dataset, patient_id=args.patient, image_ids=args.image or (),
                            reason=args.reason, with_copies=args.with_copies)
        removed = faiss_index.remove_files_before(conn, d.deletion_id)
    print(f"deleted {d.images} image(s) and {d.embeddings} embedding(s) ({d.kind}); recorded as "
          f"medsim.deletions id {d.deletion_id}")
    if d.copies:
        where = sorted({flag for _, flag in d.copies})
        print(f"{len(d.copies)} image(s) elsewhere hold the same pixels (in {', '.join(where)}: ids "
              f"{', '.join(str(i) for i, _ in d.copies[:10])}{' ...' if len(d.copies) > 10 else ''}); they were not "
              f"deleted: run again with --with-copies to delete them too")
    if removed:
        print(f"removed {len(removed)} FAISS file(s) built before this deletion (they held the deleted vectors); "
              f"rebuild with `medsim index build`")
    return 0


def cmd_audit(args) -> int:
    from medsim import audit

    with connect(args) as conn, conn.transaction():
        r = audit.run(conn, args.model, threshold=args.threshold, datasets=args.datasets)
    print(audit.format_report(r))
    return 0


def register(sub) -> None:
    s = sub.add_parser("db", help="the embedded PostgreSQL server; backups")
    s.add_argument("action", choices=["start", "stop", "status", "url", "backup", "restore"],
                   help="start/stop the embedded server, show its status, print the URL medsim uses, "
                        "or back the database up to FILE / restore FILE into it (pg_dump/pg_restore)")
    s.add_argument("file", nargs="?", default=None, metavar="FILE", help="the backup file (backup, restore)")
    s.set_defaults(func=cmd_db)

    s = sub.add_parser("psql", help="open psql on the database medsim uses (extra args go to psql)")
    s.set_defaults(func=cmd_psql)

    s = sub.add_parser("migrate", help="create or upgrade the schema (Alembic revisions, then views and functions)")
    s.add_argument("revision", nargs="?", default="head", help="target revision (default: head)")
    s.add_argument("--lock-wait", type=float, default=60.0,
                   help="seconds to wait for another session's migration lock before saying who holds it (default 60)")
    s.set_defaults(func=cmd_migrate)

    s = sub.add_parser("ingest", parents=[DATA, QUIET], help="load MedMNIST subsets into Postgres")
    s.add_argument("flags", nargs="+", metavar="FLAG", help="2D MedMNIST flags, e.g. breastmnist retinamnist")
    s.add_argument("--size", type=int, default=28, choices=[28, 64, 128, 224], help="image size (default 28)")
    s.set_defaults(func=cmd_ingest)

    s = sub.add_parser("ingest-folder", parents=[QUIET],
                       help="load a folder of PNG/JPEG/TIFF/BMP or DICOM files (your own archive)",
                       description="Labels come from PATH/<label>/<file> (the ImageFolder layout) or from "
                                   "--manifest. Re-running adds only new images; unreadable files are skipped "
                                   "and reported.")
    s.add_argument("path", metavar="PATH", help="the folder (with --manifest: the folder its paths are relative to "
                                                "is the manifest's own)")
    s.add_argument("--name", required=True, help="the dataset's name in medsim (e.g. chest-xray-2024)")
    s.add_argument("--manifest", default=None, metavar="CSV",
                   help="path,label[,split][,patient_id][,study_id][,...]; ';' separates several labels; other "
                        "columns become metadata")
    s.add_argument("--label-tag", default=None, metavar="TAG",
                   help="DICOM only: label each file by this tag's value (e.g. BodyPartExamined, Modality)")
    s.add_argument("--max-side", type=int, default=None,
                   help="shrink images whose longest side is larger (original size recorded; default: the "
                        "dataset's own, 1024 for a new one)")
    s.add_argument("--follow-links", action="store_true",
                   help="follow links that point out of the folder (by default they are refused, like absolute "
                        "and '..' paths in a manifest)")
    s.add_argument("--split-fractions", default="70,10,20",
                   help="train,val,test shares when the source gives no split (grouped by patient, "
                        "stratified by label; default 70,10,20)")
    s.add_argument("--seed", type=int, default=0, help="seed of the split assignment (default 0)")
    s.add_argument("--strict", action="store_true", help="refuse the whole folder if any file cannot be used")
    s.add_argument("--on-conflict", choices=["keep", "relabel"], default="keep",
                   help="the same pixels under another label: keep (default) the stored label and report it; "
                        "relabel: apply the source's label when all of its files agree. Pixels the source itself "
                        "labels two ways are always reported and stored once, as the first file labels them")
    s.add_argument("--relabel", action="store_true", help="the same as --on-conflict relabel")
    s.add_argument("--recheck", action="store_true",
                   help="read every file again, even those an earlier run settled and that have not changed "
                        "since (same size and modification time, or the same bytes)")
    s.set_defaults(func=cmd_ingest_folder)

    s = sub.add_parser("delete", help="delete a dataset, a patient's images or single images (one transaction)",
                       description="Embeddings and queue rows go with the images; medsim.deletions records what "
                                   "went and when (not the content); FAISS files built before refuse to load.")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--dataset", default=None, metavar="NAME", help="a whole dataset")
    g.add_argument("--patient", default=None, metavar="PATIENT_ID",
                   help="every image of this patient, in every dataset (found by its keyed hash: "
                        "MEDSIM_PATIENT_KEY must be the key used at ingest)")
    g.add_argument("--image", type=int, nargs="+", default=None, metavar="ID", help="these image ids")
    s.add_argument("--reason", default=None, help="why (kept with the record, e.g. 'consent withdrawn')")
    s.add_argument("--with-copies", action="store_true",
                   help="also delete images elsewhere with the same pixels (an archive without patient ids, say)")
    s.set_defaults(func=cmd_delete)

    s = sub.add_parser("audit", parents=[MODEL],
                       help="leakage audit: duplicates and near duplicates across splits, patients in two splits")
    s.add_argument("--threshold", type=float, default=None,
                   help="call images closer than this embedding distance near duplicates (default: pixels that "
                        "correlate at 0.995 or more once aligned, among each image's 10 nearest neighbours)")
    s.add_argument("--datasets", nargs="+", default=None, metavar="NAME", help="audit only these datasets")
    s.set_defaults(func=cmd_audit)
