"""Commands that find images: search, and the FAISS indexes and recall reports behind it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from medsim.cli.common import MODEL, OUT_DIR, READ_URL, connect, key_values, ks, numbers
from medsim.errors import BadArgument
from medsim.search import ENGINES, GALLERY_SPLITS, MAX_K
from medsim.search.index_kinds import KINDS


def cmd_search(args) -> int:
    from medsim.search import pipeline, present
    from medsim.search.context import Context
    from medsim.search.request import ByFile, ById, Filters, Request
    from medsim.sources import pacs_refs

    where = key_values(args.filter, "--filter")
    for key, value in (("dataset", args.dataset), ("label", args.label), ("split", args.split)):
        if value:
            where.setdefault(key, []).append(value)
    filters = Filters({k: v[0] if len(v) == 1 else v for k, v in where.items()},
                      include_own_patient=args.include_own_patient, per_patient=args.per_patient,
                      splits=args.splits)
    queries = [ById(i) for i in args.image_id or ()] + [ByFile(p) for p in args.image_file or ()]
    if not queries:
        raise BadArgument("give --image-id or --image-file")
    box = tuple(args.box) if args.box else None
    requests = [Request(q, k=args.k, engine=args.engine, filters=filters, model=args.model, box=box,
                        coverage=args.coverage) for q in queries]
    with connect(args, read=True) as conn:
        ctx = Context(conn, index_path=args.index)
        results = [pipeline.run(ctx, r) for r in requests]
        links = pacs_refs.viewer_links(conn, [h.image_id for r in results for h in r.hits])
        for h in (h for r in results for h in r.hits):
            h.viewer_url = links.get(h.image_id)  # images a PACS sync stored: their study in its viewer
        if args.explain and not args.montage:
            args.montage = "medsim_out/explain.png"
        if args.montage:
            net = ctx.network(results[0].model).net if args.explain else None
            present.montage(conn, results, args.montage, explain_net=net)
    print(json.dumps(present.as_json(results), indent=2) if args.json else present.table(results))
    if args.montage:
        print(f"montage: {args.montage}", file=sys.stderr if args.json else sys.stdout)
    return 0


def cmd_index(args) -> int:
    from medsim.search import faiss_index

    with connect(args) as conn:
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
            b = faiss_index.build(conn, args.model, args.kind, numbers(args.param), out=args.out,
                                  splits=tuple(args.splits.split(",")), out_dir=args.out_dir)
    m = b.meta
    print(f"built {m['kind']} index of {m['n_rows']} vectors (model {m['model_id']}, {m['dim']}-d, "
          f"from {m['source_view']}) in {m['build_seconds']:.2f}s: {b.path} (+ .json, build id {m['build_id']})")
    return 0


def cmd_recall(args) -> int:
    from medsim.search import faiss_index, recall

    wanted = ks(args.k)
    with connect(args) as conn:
        if args.all_kinds:
            with conn.transaction():
                builds = [faiss_index.build(conn, args.model, kind, out_dir=args.out_dir) for kind in KINDS]
        elif args.build_id is not None:
            builds = [faiss_index.load_build(conn, args.build_id, rebuild_if_stale=args.rebuild)]
        elif args.index is not None:
            builds = [faiss_index.load(conn, args.index, rebuild_if_stale=args.rebuild)]
        else:
            raise BadArgument("give --index PATH, --build-id N or --all-kinds")
        with conn.transaction():
            r = recall.report(conn, builds, ks=wanted, max_queries=args.max_queries or None,
                              query_splits=faiss_index.check_splits(args.queries.split(",")))
    print(recall.format_table(r))
    out = args.json or f"{args.out_dir}/recall-model{r['model_id']}-report{r['report_id']}.json"
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        json.dump(r, f, indent=2)
    print(f"stored as medsim.recall_reports id {r['report_id']}; JSON: {out}")
    return 0


def register(sub) -> None:
    s = sub.add_parser("search", parents=[MODEL, READ_URL],
                       help="find the most similar gallery images to a query image")
    s.add_argument("--image-id", type=int, action="append", help="a stored image id (repeatable)")
    s.add_argument("--image-file", action="append",
                   help="a PNG/JPEG/TIFF/BMP/DICOM file of any size and bit depth (repeatable)")
    s.add_argument("-k", type=int, default=4, help=f"neighbours per query (default 4, at most {MAX_K})")
    s.add_argument("--dataset", default=None, help="only neighbours from this dataset")
    s.add_argument("--label", default=None, help="only neighbours with this label")
    s.add_argument("--split", default=None, choices=["train", "val", "test"], help="only neighbours from this split")
    s.add_argument("--splits", default=",".join(GALLERY_SPLITS), metavar="SPLITS",
                   help="the splits to search among: train,val,test (default: every image on file), train,val, "
                        "or train (the evaluation protocol)")
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
    s.add_argument("--box", type=int, nargs=4, metavar=("X0", "Y0", "X1", "Y1"), default=None,
                   help="search with this region of the query (its own pixels; X1, Y1 excluded)")
    s.add_argument("--coverage", type=float, default=0.9, metavar="P",
                   help="the diagnosis set's coverage, 0.5-0.99 (default 0.9): the labels that hold the query's "
                        "with this probability (fitted by `medsim evaluate`)")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.add_argument("--montage", default=None, metavar="PNG", help="also write the query/neighbour figure")
    s.add_argument("--explain", action="store_true",
                   help="draw each pair's similarity map on the montage (default file medsim_out/explain.png)")
    s.set_defaults(func=cmd_search)

    s = sub.add_parser("index", help="FAISS indexes built from the SQL views")
    isub = s.add_subparsers(dest="index_command", required=True)
    b = isub.add_parser("build", parents=[MODEL, OUT_DIR],
                        help="build an index (+ .json metadata + medsim.index_builds row)")
    b.add_argument("--kind", default="flat", choices=list(KINDS),
                   help="index type: " + "; ".join(f"{k.name} = {k.about}" for k in KINDS.values()))
    b.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="override a parameter, e.g. nlist=64, nprobe=16, M=32, efSearch=128 (repeatable)")
    b.add_argument("--splits", default=",".join(GALLERY_SPLITS),
                   help="gallery splits (default train,val,test = medsim.gallery, what a search looks among)")
    b.add_argument("--out", default=None,
                   help="index file (default <out-dir>/indexes/model<ID>-<kind>-build<BUILD>.faiss)")
    b.set_defaults(func=cmd_index)
    b = isub.add_parser("list", help="every FAISS build recorded in medsim.index_builds")
    b.add_argument("--model", default=None, help="only this model (id or 'current')")
    b.set_defaults(func=cmd_index)

    s = sub.add_parser("recall", parents=[MODEL, OUT_DIR],
                       help="recall@k of FAISS (and pgvector HNSW) vs pgvector exact search")
    s.add_argument("--index", default=None, help="an index file written by `medsim index build`")
    s.add_argument("--build-id", type=int, default=None, help="an id from medsim.index_builds")
    s.add_argument("--all-kinds", action="store_true", help=f"build {', '.join(KINDS)}; compare them")
    s.add_argument("-k", default="1,10,100", help="comma-separated k values (default 1,10,100)")
    s.add_argument("--queries", default="test", help="query splits (default test)")
    s.add_argument("--max-queries", type=int, default=1000,
                   help="a seeded sample of at most this many queries (default 1000; 0: every query image). "
                        "Exact ground truth is one brute-force scan per query")
    s.add_argument("--rebuild", action="store_true", help="rebuild a stale index instead of refusing it")
    s.add_argument("--json", default=None, help="where to write the JSON report")
    s.set_defaults(func=cmd_recall)
