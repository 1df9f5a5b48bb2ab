"""`medsim` command line: a thin shell over the stage modules, which tests call directly.

It runs no SQL of its own, and it imports a stage only inside the command that uses it:
`medsim status` or `medsim search --image-id` through pgvector never pay for torch (2.7 s
to import here) or FAISS.
"""

from __future__ import annotations

import argparse
import os
import sys

import psycopg

from medsim import db
from medsim.errors import BadArgument, DatabaseUnavailable, MedsimError
from medsim.search import ENGINES, MAX_K
from medsim.search.index_kinds import KINDS
from medsim.search.pgvector_hnsw import DEFAULT_EF_CONSTRUCTION, DEFAULT_M


def _connect(args, read: bool = False):
    """A connection for a command; `read`: for searches, on the read URL (a replica) when
    one is given (--read-url, $DATABASE_READ_URL)."""
    from medsim import migrate

    url = getattr(args, "database_url", None)
    if read:  # --read-url, then $DATABASE_READ_URL, then the main database
        url = getattr(args, "read_url", None) or os.environ.get(db.READ_URL_ENV) or url
    # autocommit: each `with conn.transaction()` below is then a real transaction, never
    # a savepoint whose SET LOCAL would leak into the next step
    conn = db.connect(url, autocommit=True)
    try:
        migrate.check(conn)
    except BaseException:
        conn.close()
        raise
    return conn


# ------------------------------------------------------------------ db / migrate
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
    elif args.action in ("backup", "restore"):
        from pathlib import Path

        if args.file is None:
            raise BadArgument(f"medsim db {args.action} needs a FILE")
        url = args.database_url or db.database_url()
        if args.action == "backup":
            db.backup(url, Path(args.file))
            print(f"backup written to {args.file} (pg_dump custom format; restore with `medsim db restore`)")
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
        migrate.upgrade(url, args.revision)
    except CommandError as err:  # unknown or ambiguous revision
        raise BadArgument(f"migrate: {err}") from None
    print(f"database at revision {migrate.current(url)}")
    return 0


# ------------------------------------------------------------------ ingest
def cmd_ingest(args) -> int:
    from medsim.sources import ingest

    refused = None  # the last subset's MedsimError: the exit code of the family (2)
    with _connect(args) as conn:
        for flag in args.flags:
            try:
                r = ingest.ingest(
                    conn, flag, size=args.size, data_dir=args.data_dir,
                    accept_unofficial=args.accept_unofficial,
                    allow_download=not args.no_download, show_progress=not args.quiet,
                )
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

    source = FolderSource(args.path, manifest=args.manifest, max_side=args.max_side, label_tag=args.label_tag)
    fractions = splits.parse_fractions(args.split_fractions)
    with _connect(args) as conn:
        report = archive.ingest_archive(conn, source, args.name, strict=args.strict, relabel=args.relabel,
                                        seed=args.seed, fractions=fractions, progress=not args.quiet)
    print("\n".join(report.lines()))
    for split in ("train", "val", "test"):
        if report.per_split.get(split):
            print(f"  {split:5s} {report.per_split[split]:7d} added")
    return 0


def cmd_delete(args) -> int:
    from medsim.search import faiss_index
    from medsim.sources import deletion

    with _connect(args) as conn:
        d = deletion.delete(conn, dataset=args.dataset, patient_id=args.patient, image_ids=args.image or (),
                            reason=args.reason)
        stale = faiss_index.builds(conn)
    print(f"deleted {d.images} image(s) and {d.embeddings} embedding(s) ({d.kind}); recorded as "
          f"medsim.deletions id {d.deletion_id}")
    if stale:
        print("FAISS files built before this may hold the deleted vectors; they now refuse to load. Remove them:")
        for b in stale:
            print(f"  {b.path}")
    return 0


def cmd_audit(args) -> int:
    from medsim import audit

    with _connect(args) as conn, conn.transaction():
        r = audit.run(conn, args.model, threshold=args.threshold)
    print(audit.format_report(r))
    return 0


# ------------------------------------------------------------------ models
def cmd_train(args) -> int:
    from medsim.training import train

    try:
        given = {k: getattr(args, k) for k in ("epochs", "sampler", "per_class", "steps_per_epoch",
                                               "pairs_per_epoch", "batch_size", "lr", "patience", "augment")
                 if getattr(args, k) is not None}
        tcfg = train.TrainConfig(mode=args.mode, preset=args.preset, seed=args.seed, flags=args.datasets,
                                 device=args.device, **given)
    except BadArgument as err:
        raise BadArgument(f"train: {err}") from None
    with _connect(args) as conn:
        train.train(conn, tcfg, out_dir=args.out_dir, set_current=not args.no_set_current,
                    progress=not args.quiet)
    return 0


def cmd_evaluate(args) -> int:
    from medsim.training import evaluate

    with _connect(args) as conn:
        r = evaluate.evaluate(conn, args.model, device=args.device, exclude_leaked=args.exclude_leaked,
                              out_dir=args.out_dir)
    print(evaluate.format_table(r))
    print(f"stored as medsim.evaluations id {r['evaluation_id']}")
    return 0


def cmd_models(args) -> int:
    from medsim import registry

    with _connect(args) as conn:
        if args.set_current is not None:
            registry.set_current(conn, args.set_current)
            print(f"model {args.set_current} is now current")
        for m in registry.list_models(conn):
            loss = "-" if m.best_val_loss is None else f"{m.best_val_loss:.4f}"
            secs = "-" if m.train_seconds is None else f"{m.train_seconds:.1f}"
            print(f"{'*' if m.is_current else ' '} {m.id:4d} {m.name:18s} dim {m.embedding_dim:3d} "
                  f"on {','.join(m.datasets)}  best epoch {m.best_epoch} val loss {loss}  {secs}s  "
                  f"{m.created_at:%Y-%m-%d %H:%M}")
    return 0


# ------------------------------------------------------------------ embeddings
def cmd_status(args) -> int:
    from medsim import queue, registry

    with _connect(args) as conn:
        if args.model is not None:
            registry.get(conn, args.model)  # NotFound: "no model with id N"
        rows = queue.status(conn, args.model)
        print(f"{'model':>5s} {'name':18s} {'dataset':16s} {'total':>7s} {'embedded':>9s} "
              f"{'pending':>8s} {'failed':>7s}  oldest pending")
        for r in rows:
            since = f"{r.oldest_pending:%Y-%m-%d %H:%M:%S}" if r.oldest_pending else "-"
            print(f"{r.model_id:>4d}{'*' if r.is_current else ' '} {r.model_name:18s} {r.dataset:16s} "
                  f"{r.total:7d} {r.embedded:9d} {r.pending:8d} {r.failed:7d}  {since}")
        if not rows:
            print("(no models or no images yet)")
        for f in queue.failures(conn, args.model):
            state = "FAILED" if f.failed_at else "retrying"
            print(f"  model {f.model_id} image {f.image_id}: {state} after {f.attempts} attempt(s): "
                  f"{f.last_error}")
    return 0


def cmd_pgindex(args) -> int:
    from medsim import registry
    from medsim.search import pgvector_hnsw

    with _connect(args) as conn:
        row = registry.get(conn, args.model)
        built = pgvector_hnsw.ensure(conn, row.id, row.embedding_dim, m=args.m,
                                     ef_construction=args.ef_construction, replace=args.rebuild)
        print(f"{pgvector_hnsw.index_name(row.id)}: "
              + (f"built (m={args.m}, ef_construction={args.ef_construction})" if built
                 else "already exists (--rebuild to build it again with these parameters)"))
    return 0


# ------------------------------------------------------------------ FAISS and recall
def _params(pairs) -> dict:
    out = {}
    for item in pairs or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise BadArgument(f"--param expects KEY=VALUE, got {item!r}")
        try:
            out[key] = int(value) if value.lstrip("-").isdigit() else float(value)
        except ValueError:
            raise BadArgument(f"--param {key} expects a number, got {value!r}") from None
    return out


def _ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(sorted({int(k) for k in text.split(",")}))
    except ValueError:
        raise BadArgument(f"-k expects comma-separated integers, got {text!r}") from None
    if not ks or ks[0] < 1 or ks[-1] > MAX_K:
        raise BadArgument(f"-k values must be between 1 and {MAX_K}")
    return ks


def cmd_index(args) -> int:
    from medsim.search import faiss_index

    with _connect(args) as conn:
        if args.index_command == "list":
            from medsim import registry

            mid = None if args.model is None else registry.get(conn, args.model).id
            found = faiss_index.builds(conn, mid)
            for b in found:
                print(f"{b.id:5d}  model {b.model_id:<4d} {b.kind:8s} {b.n_rows:9d} rows  "
                      f"{b.created_at:%Y-%m-%d %H:%M}  {b.path}")
            if not found:
                print("(no FAISS index builds yet: medsim index build)")
            return 0
        with conn.transaction():
            b = faiss_index.build(conn, args.model, args.kind, _params(args.param), out=args.out,
                                  splits=tuple(args.splits.split(",")), out_dir=args.out_dir)
    m = b.meta
    print(f"built {m['kind']} index of {m['n_rows']} vectors (model {m['model_id']}, {m['dim']}-d, "
          f"from {m['source_view']}) in {m['build_seconds']:.2f}s: {b.path} (+ .json, build id {m['build_id']})")
    return 0


def cmd_recall(args) -> int:
    import json
    from pathlib import Path

    from medsim.search import faiss_index, recall

    ks = _ks(args.k)
    with _connect(args) as conn:
        if args.all_kinds:
            with conn.transaction():
                builds = [faiss_index.build(conn, args.model, kind, out_dir=args.out_dir) for kind in KINDS]
        else:
            if args.build_id is not None:
                builds = [faiss_index.load_build(conn, args.build_id, rebuild_if_stale=args.rebuild)]
            elif args.index is not None:
                builds = [faiss_index.load(conn, args.index, rebuild_if_stale=args.rebuild)]
            else:
                raise BadArgument("give --index PATH, --build-id N or --all-kinds")
        with conn.transaction():
            r = recall.report(conn, builds, ks=ks, max_queries=args.max_queries or None,
                              query_splits=faiss_index.check_splits(args.queries.split(",")))
    print(recall.format_table(r))
    out = args.json or f"{args.out_dir}/recall-model{r['model_id']}-report{r['report_id']}.json"
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        json.dump(r, f, indent=2)
    print(f"stored as medsim.recall_reports id {r['report_id']}; JSON: {out}")
    return 0


# ------------------------------------------------------------------ search
def cmd_search(args) -> int:
    import json

    from medsim.search import similar

    with _connect(args, read=True) as conn:
        where = {}
        for item in args.filter or []:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise BadArgument(f"--filter expects KEY=VALUE, got {item!r}")
            where.setdefault(key, []).append(value)  # repeated keys: any of the values
        for key, value in (("label", args.label), ("split", args.split)):
            if value:
                where.setdefault(key, []).append(value)
        filters = similar.Filters({k: v[0] if len(v) == 1 else v for k, v in where.items()},
                                  include_own_patient=args.include_own_patient, per_patient=args.per_patient)
        results = similar.search(conn, image_ids=args.image_id or (), image_files=args.image_file or (),
                                 k=args.k, dataset=args.dataset, engine=args.engine,
                                 model_ref=args.model, index_path=args.index, filters=filters)
        if args.montage:
            similar.montage(conn, results, args.montage)
    print(json.dumps(similar.as_json(results), indent=2) if args.json else similar.format_results(results))
    if args.montage:
        print(f"montage: {args.montage}", file=sys.stderr if args.json else sys.stdout)
    return 0


# ------------------------------------------------------------------ serve
def cmd_serve(args) -> int:
    from medsim.service.app import serve
    from medsim.service.core import ServeConfig

    if args.max_upload_mb <= 0:
        raise BadArgument(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
    cfg = ServeConfig(host=args.host, port=args.port, database_url=args.database_url, read_url=args.read_url,
                      max_upload_bytes=int(args.max_upload_mb * 1024 * 1024), pool_size=args.pool_size,
                      max_image_pixels=args.max_image_pixels)
    print(f"medsim serve: http://{args.host}:{args.port}/ (the page), /docs (the API); database: {db.source()}",
          flush=True)
    serve(cfg, access_log=args.access_log)
    return 0


# ------------------------------------------------------------------ demo
def cmd_demo(args) -> int:
    from medsim import demo
    from medsim.training import train

    try:
        given = {k: getattr(args, k) for k in ("epochs", "steps_per_epoch") if getattr(args, k) is not None}
        tcfg = train.TrainConfig(device=args.device, **given)
    except BadArgument as err:
        raise BadArgument(f"demo: {err}") from None
    cfg = demo.DemoConfig(flags=tuple(args.flags), data_dir=args.data_dir,
                          accept_unofficial=args.accept_unofficial, allow_download=not args.no_download,
                          out_dir=args.out_dir, train=tcfg, database_url=args.database_url,
                          progress=not args.quiet)
    demo.run(cfg)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="medsim",
        description="Medical image similarity search on PostgreSQL + pgvector. New here? Run "
                    "`medsim demo --help`; the database is the embedded one unless DATABASE_URL is set.")
    p.add_argument("--database-url", default=None,
                   help="postgresql:// URL (default: $DATABASE_URL, then PG* variables, then the embedded server)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("db", help="the embedded PostgreSQL server; backups")
    s.add_argument("action", choices=["start", "stop", "status", "url", "backup", "restore"],
                   help="start/stop the embedded server, show its status, print the URL medsim uses, "
                        "or back the database up to FILE / restore FILE into it (pg_dump/pg_restore)")
    s.add_argument("file", nargs="?", default=None, metavar="FILE", help="the backup file (backup, restore)")
    s.set_defaults(func=cmd_db)

    s = sub.add_parser("psql", help="open psql on the database medsim uses (extra args go to psql)")
    s.set_defaults(func=cmd_psql)

    s = sub.add_parser("migrate", help="apply Alembic migrations (same as `alembic upgrade head`)")
    s.add_argument("revision", nargs="?", default="head", help="target revision (default: head)")
    s.set_defaults(func=cmd_migrate)

    s = sub.add_parser("ingest", help="load MedMNIST subsets into Postgres")
    s.add_argument("flags", nargs="+", metavar="FLAG", help="2D MedMNIST flags, e.g. breastmnist retinamnist")
    s.add_argument("--size", type=int, default=28, choices=[28, 64, 128, 224], help="image size (default 28)")
    s.add_argument("--data-dir", default=None,
                   help="directory holding the .npz files (default: $MEDSIM_DATA_DIR, then ~/.medmnist)")
    s.add_argument("--accept-unofficial", action="store_true",
                   help="ingest a file whose md5 differs from the catalogue but whose structure matches")
    s.add_argument("--no-download", action="store_true", help="never try to download missing files")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_ingest)

    s = sub.add_parser("ingest-folder", help="load a folder of PNG/JPEG/TIFF/BMP or DICOM files (your own archive)",
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
    s.add_argument("--max-side", type=int, default=1024,
                   help="shrink images whose longest side is larger (original size recorded; default 1024)")
    s.add_argument("--split-fractions", default="70,10,20",
                   help="train,val,test shares when the source gives no split (grouped by patient, "
                        "stratified by label; default 70,10,20)")
    s.add_argument("--seed", type=int, default=0, help="seed of the split assignment (default 0)")
    s.add_argument("--strict", action="store_true", help="refuse the whole folder if any file cannot be used")
    s.add_argument("--relabel", action="store_true",
                   help="apply label changes for images already ingested (otherwise only reported)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
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
    s.set_defaults(func=cmd_delete)

    s = sub.add_parser("audit", help="leakage audit: duplicates and near duplicates across splits, patients in two splits")
    s.add_argument("--model", default="current", help="whose embeddings define near duplicates (id or 'current')")
    s.add_argument("--threshold", type=float, default=None,
                   help="embedding distance under which two images are near duplicates (default: a tenth of "
                        "the median nearest-neighbour distance)")
    s.set_defaults(func=cmd_audit)

    s = sub.add_parser("train", help="train the Siamese network and register it as the current model")
    s.add_argument("--mode", choices=["label", "dataset"], default="label",
                   help="positive pairs: same subset and label (label), or same subset (dataset)")
    s.add_argument("--preset", default="default", choices=["default", "seed"],
                   help="network: default (28 px CNN) or seed (the published notebook's, 128 px)")
    s.add_argument("--epochs", type=int, default=None, help="maximum epochs (default: the recipe's)")
    s.add_argument("--sampler", choices=["pk", "pairs"], default=None,
                   help="pk (default): batches of --per-class images of every diagnosis, every pair used; "
                        "pairs: independent balanced pairs (the first recipe)")
    s.add_argument("--per-class", type=int, default=None, help="pk: images of each diagnosis per batch")
    s.add_argument("--steps-per-epoch", type=int, default=None, help="pk: optimisation steps per epoch")
    s.add_argument("--pairs-per-epoch", type=int, default=None, help="pairs: pairs sampled per epoch")
    s.add_argument("--batch-size", type=int, default=None, help="pairs: pairs per optimisation step")
    s.add_argument("--augment", choices=["none", "flip", "affine"], default=None,
                   help="training augmentation (default affine: shifts, turns, flips, intensity)")
    s.add_argument("--lr", type=float, default=None, help="AdamW peak learning rate")
    s.add_argument("--patience", type=int, default=None,
                   help="epochs without improvement of the validation score before stopping "
                        "(default: run every epoch, keep the best)")
    s.add_argument("--seed", type=int, default=0, help="random seed for pairs, init and augmentation")
    s.add_argument("--datasets", nargs="+", default=None, metavar="FLAG",
                   help="subsets to train on (default: every ingested one)")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to train")
    s.add_argument("--out-dir", default="medsim_out", help="where loss/accuracy curve PNGs go")
    s.add_argument("--no-set-current", action="store_true", help="register without making it current")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("evaluate", help="pair verification and retrieval metrics, stored in Postgres")
    s.add_argument("--model", default="current", help="model id or 'current'")
    s.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run the model")
    s.add_argument("--exclude-leaked", action="store_true",
                   help="leave out test queries the latest `medsim audit` paired with a train/val image")
    s.add_argument("--out-dir", default="medsim_out", help="where the reliability diagram goes")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("models", help="list registered models; --set-current switches")
    s.add_argument("--set-current", type=int, default=None, metavar="ID", help="make model ID current")
    s.set_defaults(func=cmd_models)

    s = sub.add_parser("status", help="embedding progress per model and dataset")
    s.add_argument("--model", type=int, default=None, help="only this model id")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("pgindex", help="build a model's pgvector HNSW index (workers do it after draining)")
    s.add_argument("--model", default="current", help="model id or 'current'")
    s.add_argument("--m", type=int, default=DEFAULT_M, help="HNSW m (links per node)")
    s.add_argument("--ef-construction", type=int, default=DEFAULT_EF_CONSTRUCTION,
                   help="HNSW ef_construction (default %(default)s; pgvector's own default of 64 "
                        "left recall@10 under 0.99 on some builds)")
    s.add_argument("--rebuild", action="store_true", help="drop and build the index again")
    s.set_defaults(func=cmd_pgindex)

    s = sub.add_parser("index", help="FAISS indexes built from the SQL views")
    isub = s.add_subparsers(dest="index_command", required=True)
    b = isub.add_parser("build", help="build an index (+ .json metadata + medsim.index_builds row)")
    b.add_argument("--model", default="current", help="model id or 'current'")
    b.add_argument("--kind", default="flat", choices=list(KINDS),
                   help="index type: " + "; ".join(f"{k.name} = {k.about}" for k in KINDS.values()))
    b.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="override a parameter, e.g. nlist=64, nprobe=16, M=32, efSearch=128 (repeatable)")
    b.add_argument("--splits", default="train,val", help="gallery splits (default train,val = medsim.gallery)")
    b.add_argument("--out", default=None,
                   help="index file (default <out-dir>/indexes/model<ID>-<kind>-build<BUILD>.faiss)")
    b.add_argument("--out-dir", default="medsim_out", help="output directory for default paths")
    b.set_defaults(func=cmd_index)
    b = isub.add_parser("list", help="every FAISS build recorded in medsim.index_builds")
    b.add_argument("--model", default=None, help="only this model (id or 'current')")
    b.set_defaults(func=cmd_index)

    s = sub.add_parser("recall", help="recall@k of FAISS (and pgvector HNSW) vs pgvector exact search")
    s.add_argument("--index", default=None, help="an index file written by `medsim index build`")
    s.add_argument("--build-id", type=int, default=None, help="an id from medsim.index_builds")
    s.add_argument("--all-kinds", action="store_true", help=f"build {', '.join(KINDS)}; compare them")
    s.add_argument("--model", default="current", help="model for --all-kinds (id or 'current')")
    s.add_argument("-k", default="1,10,100", help="comma-separated k values (default 1,10,100)")
    s.add_argument("--queries", default="test", help="query splits (default test)")
    s.add_argument("--max-queries", type=int, default=1000,
                   help="a seeded sample of at most this many queries (default 1000; 0: every query image). "
                        "Exact ground truth is one brute-force scan per query")
    s.add_argument("--rebuild", action="store_true", help="rebuild a stale index instead of refusing it")
    s.add_argument("--json", default=None, help="where to write the JSON report")
    s.add_argument("--out-dir", default="medsim_out", help="output directory for indexes and reports")
    s.set_defaults(func=cmd_recall)

    s = sub.add_parser("search", help="find the most similar gallery images to a query image")
    s.add_argument("--image-id", type=int, action="append", help="a stored image id (repeatable)")
    s.add_argument("--image-file", action="append", help="a PNG/JPEG/... file of any size (repeatable)")
    s.add_argument("-k", type=int, default=4, help=f"neighbours per query (default 4, at most {MAX_K})")
    s.add_argument("--dataset", default=None, help="only neighbours from this dataset")
    s.add_argument("--label", default=None, help="only neighbours with this label")
    s.add_argument("--split", default=None, choices=["train", "val"], help="only neighbours from this split")
    s.add_argument("--filter", action="append", metavar="KEY=VALUE",
                   help="only neighbours whose metadata KEY is VALUE (repeatable; a repeated key means any of "
                        "the values), e.g. modality=CR, site=north, BodyPartExamined=CHEST")
    s.add_argument("--include-own-patient", action="store_true",
                   help="also return other images of the query's patient (left out by default)")
    s.add_argument("--per-patient", type=int, default=None, metavar="N",
                   help="at most N neighbours per patient (images without a patient count alone)")
    s.add_argument("--engine", default="pgvector", choices=ENGINES,
                   help="pgvector (HNSW in Postgres), exact (pgvector without the index) or faiss (the latest "
                        "index built for the model)")
    s.add_argument("--index", default=None, help="FAISS index file (default: latest build for the model)")
    s.add_argument("--model", default="current", help="model id or 'current'")
    s.add_argument("--read-url", default=None,
                   help="search on this database, e.g. a streaming replica (default: $DATABASE_READ_URL, else "
                        "the main database)")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.add_argument("--montage", default=None, metavar="PNG", help="also write the query/neighbour figure")
    s.set_defaults(func=cmd_search)

    s = sub.add_parser("serve", help="the HTTP API and the web page (FastAPI + uvicorn)",
                       description="Keeps the current model and its FAISS index warm; searches run as the "
                                   "read-only role medsim_reader, on DATABASE_READ_URL when set (a replica).")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    s.add_argument("--read-url", default=None,
                   help="postgresql:// URL for searches (default: $DATABASE_READ_URL, else the main database)")
    s.add_argument("--max-upload-mb", type=float, default=20, help="largest request body accepted (default 20)")
    s.add_argument("--max-image-pixels", type=int, default=40_000_000,
                   help="largest uploaded image, width x height, checked before decoding (default 40,000,000)")
    s.add_argument("--pool-size", type=int, default=8, help="read connections at most (default 8)")
    s.add_argument("--access-log", action="store_true", help="log every request (uvicorn's access log)")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("demo", help="run everything: ingest, train, embed, index, recall, evaluate, montage")
    s.add_argument("--data-dir", default=None, help="directory with the MedMNIST .npz files (offline use)")
    s.add_argument("--accept-unofficial", action="store_true",
                   help="accept files whose md5 differs from the catalogue but whose structure matches")
    s.add_argument("--no-download", action="store_true", help="never try to download missing files")
    s.add_argument("--flags", nargs="+", default=["dermamnist", "pneumoniamnist", "retinamnist", "breastmnist"],
                   metavar="FLAG", help="subsets to use (default: the starting four)")
    s.add_argument("--epochs", type=int, default=None, help="training epochs (default: the recipe's)")
    s.add_argument("--steps-per-epoch", type=int, default=None, help="training steps per epoch (default: the recipe's)")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to train")
    s.add_argument("--out-dir", default="medsim_out", help="where figures, indexes and reports go")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_demo)

    return p


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "psql":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    try:
        return args.func(args)
    except MedsimError as err:
        # something the user can fix: one sentence. Anything else is a bug and keeps its
        # traceback (Python prints it and exits 1).
        print(f"medsim: error: {err}", file=sys.stderr)
        return err.exit_code
    except psycopg.OperationalError as err:
        # the server went away (or was never there) mid-command: whatever was in flight
        # rolled back; an operator's problem, not a bug in medsim
        print(f"medsim: error: lost the database ({db.source()}): {str(err).strip().splitlines()[0]}; "
              f"what was in flight was rolled back", file=sys.stderr)
        return DatabaseUnavailable.exit_code
    except BrokenPipeError:
        # output piped into `head` and the like: not worth a traceback. Point stdout at
        # devnull so the interpreter's final flush does not fail again (Python docs recipe).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
