"""Commands about embeddings: the worker, embedding status, the pgvector HNSW index."""

from __future__ import annotations

from medsim.cli.common import MODEL, connect
from medsim.search.pgvector_hnsw import DEFAULT_EF_CONSTRUCTION, DEFAULT_M


def cmd_worker(args) -> int:
    from medsim.worker.config import from_args
    from medsim.worker.main import run

    return run(from_args(args), prog="medsim worker")


def cmd_status(args) -> int:
    from medsim import queue, registry
    from medsim.training import recent

    with connect(args) as conn:
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
        for r in rows:  # what a search cannot see yet, in the words a search uses
            if r.note:
                print(r.note)
        checks = recent.of_models(conn, {r.model_id for r in rows})
        for r in rows:  # a calibration whose coverage fell short on recent images, as a search says it
            said = recent.note(checks.get((r.model_id, r.dataset)), r.dataset)
            if said:
                print(f"model {r.model_id} {said}")
        for f in queue.failures(conn, args.model):
            state = "FAILED" if f.failed_at else "retrying"
            print(f"  model {f.model_id} image {f.image_id}: {state} after {f.attempts} attempt(s): {f.last_error}")
    return 0


def cmd_pgindex(args) -> int:
    from medsim import registry
    from medsim.search import pgvector_hnsw

    with connect(args) as conn:
        row = registry.get(conn, args.model)
        built = pgvector_hnsw.ensure(conn, row.id, row.embedding_dim, m=args.m,
                                     ef_construction=args.ef_construction, replace=args.rebuild)
        print(f"{pgvector_hnsw.index_name(row.id)}: "
              + (f"built (m={args.m}, ef_construction={args.ef_construction})" if built
                 else "already exists (--rebuild to build it again with these parameters)"))
    return 0


def register(sub) -> None:
    from medsim.worker import config

    s = sub.add_parser("worker", help="the embedding worker (same as python -m medsim.embed_worker)",
                       description=config.DESCRIPTION)
    config.add_arguments(s)
    s.set_defaults(func=cmd_worker)

    s = sub.add_parser("status", help="embedding progress per model and dataset")
    s.add_argument("--model", type=int, default=None, help="only this model id")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("pgindex", parents=[MODEL],
                       help="build a model's pgvector HNSW index (workers do it after draining)")
    s.add_argument("--m", type=int, default=DEFAULT_M, help="HNSW m (links per node)")
    s.add_argument("--ef-construction", type=int, default=DEFAULT_EF_CONSTRUCTION,
                   help="HNSW ef_construction (default %(default)s; pgvector's own default of 64 "
                        "left recall@10 under 0.99 on some builds)")
    s.add_argument("--rebuild", action="store_true", help="drop and build the index again")
    s.set_defaults(func=cmd_pgindex)
