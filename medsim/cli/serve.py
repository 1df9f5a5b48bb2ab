"""Commands that run everything: serve (the HTTP API and page) and demo."""

from __future__ import annotations

from medsim import db, settings
from medsim.cli.common import DATA, OUT_DIR, QUIET, READ_URL
from medsim.errors import BadArgument


def cmd_serve(args) -> int:
    from medsim.service.app import serve
    from medsim.service.guard import TrustedProxies
    from medsim.service.state import ServeConfig

    if args.threads is not None and args.threads < 1:
        raise BadArgument(f"--threads must be at least 1, got {args.threads}")
    if args.upload_retention_hours < 0:
        raise BadArgument(f"--upload-retention-hours must not be negative, got {args.upload_retention_hours}")
    if args.max_upload_mb <= 0:
        raise BadArgument(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
    cfg = ServeConfig(host=args.host, port=args.port, database_url=args.database_url, read_url=args.read_url,
                      max_upload_bytes=int(args.max_upload_mb * 1024 * 1024), pool_size=args.pool_size,
                      max_image_pixels=args.max_image_pixels or settings.get().max_image_pixels,
                      auth=not args.no_auth, no_auth_public=args.no_auth_public, torch_threads=args.threads,
                      runtime=args.runtime, upload_retention_h=args.upload_retention_hours,
                      forwarded_allow_ips=args.forwarded_allow_ips)
    TrustedProxies(args.forwarded_allow_ips)  # a malformed list is one sentence before the service starts
    print(f"medsim serve: http://{args.host}:{args.port}/ (the page), /docs (the API); database: {db.source()}",
          flush=True)
    warn_default_password(args.host)
    if args.no_auth:
        print(f"AUTHENTICATION IS OFF (--no-auth): ANYONE WHO REACHES {args.host}:{args.port} SEES EVERY DATASET, "
              f"AND THE ACCESS LOG NAMES NO ONE", flush=True)
    else:
        print("every request needs a token (Authorization: Bearer ...); make one with: medsim user add NAME && "
              "medsim grant NAME --all && medsim token create NAME", flush=True)
    serve(cfg, access_log=args.access_log)
    return 0


DEFAULT_PASSWORDS = {"medsim", "postgres", "password", "admin"}  # what compose files and tutorials ship


def warn_default_password(host: str) -> None:
    """A database password everyone knows, on a service others can reach: say so."""
    from psycopg.conninfo import conninfo_to_dict

    from medsim.service.state import loopback_host

    if not loopback_host(host) and conninfo_to_dict(db.database_url()).get("password") in DEFAULT_PASSWORDS:
        print("WARNING: the database password is a well-known default; set a real one (POSTGRES_PASSWORD in the "
              "compose file) before this service is reachable from other machines", flush=True)


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


def register(sub) -> None:
    s = sub.add_parser("serve", parents=[READ_URL], help="the HTTP API and the web page (FastAPI + uvicorn)",
                       description="Keeps the current model and its FAISS index warm. Every request needs a "
                                   "token (medsim token create); it runs as its user's PostgreSQL role, which "
                                   "sees only the datasets granted to it, on DATABASE_READ_URL when set (a "
                                   "replica). Searches and images served go to medsim.access_log.")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    s.add_argument("--max-upload-mb", type=float, default=20, help="largest request body accepted (default 20)")
    s.add_argument("--max-image-pixels", type=int, default=None,
                   help="largest uploaded image, width x height, checked before decoding (default "
                        "$MEDSIM_MAX_IMAGE_PIXELS, else 40,000,000)")
    s.add_argument("--pool-size", type=int, default=8, help="read connections at most (default 8)")
    s.add_argument("--threads", type=int, default=None,
                   help="torch threads per upload's forward pass (default 1, or OMP_NUM_THREADS): requests in "
                        "parallel are the service's parallelism")
    s.add_argument("--runtime", choices=("onnx", "torch"), default=None,
                   help="what runs the network for uploads (default: $MEDSIM_RUNTIME, else onnx where its "
                        "embeddings match torch's)")
    s.add_argument("--upload-retention-hours", type=float, default=24.0,
                   help="keep an upload's pixels this long so its search has a URL (default 24; 0: keep none); "
                        "then deleted, and the access log says so")
    s.add_argument("--access-log", action="store_true", help="log every request (uvicorn's access log)")
    s.add_argument("--forwarded-allow-ips", default=None, metavar="IPS",
                   help="proxies whose X-Forwarded-For header is believed for the client's address (addresses "
                        "or networks, comma-separated, or '*'); default: none, the peer's address is the client's")
    s.add_argument("--no-auth", action="store_true",
                   help="serve without tokens: every request sees every dataset as medsim_reader (for a "
                        "one-person machine; said in capitals at start and in every log line); refused on a "
                        "--host other machines reach unless --no-auth-public is given too")
    s.add_argument("--no-auth-public", action="store_true",
                   help="with --no-auth, allow a --host other machines reach (0.0.0.0, a LAN address): everyone "
                        "who reaches it sees every dataset")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("demo", parents=[DATA, OUT_DIR, QUIET],
                       help="run everything: ingest, train, embed, index, recall, evaluate, montage")
    s.add_argument("--flags", nargs="+", default=["dermamnist", "pneumoniamnist", "retinamnist", "breastmnist"],
                   metavar="FLAG", help="subsets to use (default: the starting four)")
    s.add_argument("--epochs", type=int, default=None, help="training epochs (default: the recipe's)")
    s.add_argument("--steps-per-epoch", type=int, default=None, help="training steps per epoch (default: the recipe's)")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to train")
    s.set_defaults(func=cmd_demo)
