"""Commands about models: train, evaluate, models (list, switch the current one)."""

from __future__ import annotations

import json

from medsim.cli.common import MODEL, OUT_DIR, QUIET, admin_name, connect
from medsim.errors import BadArgument

TRAIN_FIELDS = ("epochs", "sampler", "per_class", "steps_per_epoch", "pairs_per_epoch", "batch_size", "lr",
                "patience", "augment", "pretrain_epochs")


def cmd_train(args) -> int:
    from medsim.training import train

    if args.on is not None:
        return _train_on(args)
    try:
        given = {k: getattr(args, k) for k in TRAIN_FIELDS if getattr(args, k) is not None}
        tcfg = train.TrainConfig(mode=args.mode, preset=args.preset, seed=args.seed, flags=args.datasets,
                                 device=args.device, input_size=args.image_size, **given)
    except BadArgument as err:
        raise BadArgument(f"train: {err}") from None
    with connect(args) as conn:
        train.train(conn, tcfg, out_dir=args.out_dir, progress=not args.quiet,
                    set_current=True if args.set_current else (False if args.no_set_current else None),
                    candidate=not args.no_set_current, promote_when_ready=args.promote_when_ready)
    return 0


def _train_on(args) -> int:
    from medsim.training import encoders, train

    given = {k: getattr(args, k) for k in ("epochs", "per_class", "steps_per_epoch") if getattr(args, k) is not None}
    tcfg = train.TrainConfig(mode=args.mode, seed=args.seed, flags=args.datasets, **given)
    with connect(args) as conn:
        encoders.train_head(conn, args.on, tcfg, promote_when_ready=args.promote_when_ready,
                            log=(lambda *a: None) if args.quiet else print)
    return 0


def _numbers(text: str | None, what: str):
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise BadArgument(f"--{what} takes numbers separated by commas (e.g. 0.485,0.456,0.406), got {text!r}") from None


def cmd_import(args) -> int:
    from medsim.training import encoders

    with connect(args) as conn:
        encoders.import_encoder(conn, args.file, name=args.name, input_size=args.input_size, channels=args.channels,
                                mean=_numbers(args.mean, "mean"), std=_numbers(args.std, "std"),
                                promote_when_ready=args.promote_when_ready)
    return 0


def cmd_evaluate(args) -> int:
    from medsim.training import evaluate

    with connect(args) as conn:
        r = evaluate.evaluate(conn, args.model, device=args.device, exclude_leaked=args.exclude_leaked,
                              out_dir=args.out_dir, datasets=args.datasets)
    print(evaluate.format_table(r))
    print(f"stored as medsim.evaluations id {r['evaluation_id']}")
    return 0


def cmd_calibration_check(args) -> int:
    from datetime import datetime, timezone

    from medsim.training import recheck

    try:
        since = datetime.fromisoformat(args.since)
    except ValueError:
        raise BadArgument(f"--since must be a date like 2026-12-01 (or an ISO time), got {args.since!r}") from None
    since = since if since.tzinfo else since.replace(tzinfo=timezone.utc)
    if not 0.5 <= args.coverage <= 0.99:
        raise BadArgument(f"--coverage must be between 0.5 and 0.99, got {args.coverage}")
    with connect(args) as conn:
        r = recheck.check(conn, args.model, since, coverage=args.coverage)
    print(json.dumps(r, indent=2) if args.json else recheck.format_check(r))
    return 0


def cmd_compare(args) -> int:
    from medsim.training import compare

    if args.threads < 1:
        raise BadArgument(f"--threads must be at least 1, got {args.threads}")
    with connect(args) as conn:
        c = compare.run(conn, args.ids or None, measure=not args.no_timing, threads=args.threads)
    print(compare.format_table(c))
    return 0


def cmd_models(args) -> int:
    from medsim import registry
    from medsim.search import promotion

    command = getattr(args, "models_command", None)
    with connect(args) as conn:
        if command in ("promote", "rollback") or args.set_current is not None:
            by = admin_name()
            if command == "rollback":
                p = promotion.rollback(conn, force=args.force, by=by)
            else:
                ref = args.id if command == "promote" else args.set_current
                p = promotion.promote(conn, ref, force=getattr(args, "force", False), by=by,
                                      kind="promote" if command == "promote" else "set")
            gap = f"; {p.missing:,} of {p.total:,} images still have no embedding for it" if p.missing else ""
            print(f"model {p.model_id} is now current (it replaced model {p.previous_id}){gap}; running services "
                  f"follow at their next request; `medsim models rollback` returns to model {p.previous_id}")
            return 0
        for m in registry.list_models(conn):
            loss = "-" if m.best_val_loss is None else f"{m.best_val_loss:.4f}"
            secs = "-" if m.train_seconds is None else f"{m.train_seconds:.1f}"
            missing, total = promotion.missing(conn, m.id) if m.is_current or m.candidate else (None, None)
            state = "current" if m.is_current else "candidate" if m.candidate else ""
            if total:
                state += f" ({total - missing:,}/{total:,} embedded)"
            print(f"{'*' if m.is_current else ' '} {m.id:4d} {m.name:18s} dim {m.embedding_dim:3d} "
                  f"on {','.join(m.datasets) or '(none: imported)'}  best epoch {m.best_epoch or '-'} val loss {loss}  {secs}s  "
                  f"{m.created_at:%Y-%m-%d %H:%M}  {state}".rstrip())
    return 0


def register(sub) -> None:
    s = sub.add_parser("train", parents=[OUT_DIR, QUIET],
                       help="train the Siamese network and register it as the current model")
    s.add_argument("--mode", choices=["label", "dataset"], default="label",
                   help="positive pairs: same subset and label (label), or same subset (dataset)")
    s.add_argument("--preset", default=None, choices=["default", "resnet", "seed"],
                   help="network: default (the 28 px CNN), resnet (ResNet-18 from scratch, for larger inputs) or "
                        "seed (the published notebook's, 128 px); default: chosen from the input size "
                        "(28 px: default, larger: resnet)")
    s.add_argument("--image-size", type=int, default=None, metavar="N",
                   help="the network's input size in px, 16 to 512 (larger than the stored images: upscaled, with "
                        "a warning); default: the training images' median stored size, rounded down to a multiple "
                        "of 16 and capped at 128 px on a CPU and 224 on a GPU (28 for MedMNIST's 28 px subsets)")
    s.add_argument("--epochs", type=int, default=None, help="maximum epochs (default: the recipe's)")
    s.add_argument("--sampler", choices=["pk", "pairs"], default=None,
                   help="pk (default): batches of --per-class images of every diagnosis, every pair used; "
                        "pairs: independent balanced pairs (the first recipe)")
    s.add_argument("--per-class", type=int, default=None, help="pk: images of each diagnosis per batch")
    s.add_argument("--steps-per-epoch", type=int, default=None, help="pk: optimisation steps per epoch")
    s.add_argument("--pairs-per-epoch", type=int, default=None, help="pairs: pairs sampled per epoch")
    s.add_argument("--batch-size", type=int, default=None, help="pairs: pairs per optimisation step")
    s.add_argument("--augment", choices=["none", "flip", "affine", "any_size"], default=None,
                   help="training augmentation (default affine: shifts, turns, flips, intensity; any_size adds "
                        "what a query arriving at another size goes through: re-sampling at 0.5-4x by nearest, "
                        "bilinear, bicubic or area, JPEG-like blocks, blur, mild crops)")
    s.add_argument("--lr", type=float, default=None, help="AdamW peak learning rate")
    s.add_argument("--patience", type=int, default=None,
                   help="epochs without improvement of the validation score before stopping "
                        "(default: run every epoch, keep the best)")
    s.add_argument("--pretrain-epochs", type=int, default=None, metavar="N",
                   help="N epochs of self-supervised contrastive pre-training (SimCLR) on the train and val "
                        "images, labels unused, before the supervised stage (default 0: none)")
    s.add_argument("--seed", type=int, default=0, help="random seed for pairs, init and augmentation")
    s.add_argument("--datasets", nargs="+", default=None, metavar="FLAG",
                   help="subsets to train on (default: every ingested one)")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to train")
    s.add_argument("--no-set-current", action="store_true",
                   help="register only: neither current nor a candidate (workers do not embed it)")
    s.add_argument("--set-current", action="store_true",
                   help="make it current at once, before its gallery is embedded (searches see only what is "
                        "done); default: a candidate, promoted without downtime (medsim models promote)")
    s.add_argument("--promote-when-ready", action="store_true",
                   help="make the candidate current as soon as the workers have embedded its whole gallery")
    s.add_argument("--on", default=None, metavar="MODEL",
                   help="train a small contrastive head on an imported encoder's frozen features (`medsim models "
                        "import`) instead of a network: features computed once, so minutes")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("evaluate", parents=[MODEL, OUT_DIR],
                       help="pair verification and retrieval metrics, stored in Postgres")
    s.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run the model")
    s.add_argument("--exclude-leaked", action="store_true",
                   help="leave out test queries the latest `medsim audit` paired with a train/val image")
    s.add_argument("--datasets", nargs="+", default=None, metavar="FLAG",
                   help="datasets to evaluate and calibrate, trained on or not (default: those the model was "
                        "trained on and every one it has embeddings for); each needs labels, a val and a test split")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("calibration", help="the stored calibration checked where it is used")
    csub = s.add_subparsers(dest="calibration_command", required=True)
    c = csub.add_parser("check", parents=[MODEL],
                        help="the diagnosis set's coverage and the vote's over-claim on labelled images ingested "
                             "since a date, against the train images before it; says 'not verified on recent "
                             "images' where coverage falls short")
    c.add_argument("--since", required=True, metavar="DATE", help="images ingested at or after this date (UTC)")
    c.add_argument("--coverage", type=float, default=0.9, help="the set's level to check (default 0.9)")
    c.add_argument("--json", action="store_true", help="print JSON instead of a table")
    c.set_defaults(func=cmd_calibration_check)

    s = sub.add_parser("models", help="list registered models (current, candidates, how far embedded); promote, "
                                      "roll back")
    s.add_argument("--set-current", type=int, default=None, metavar="ID",
                   help="make model ID current, as `medsim models promote ID` does")
    s.set_defaults(func=cmd_models)
    msub = s.add_subparsers(dest="models_command")
    p = msub.add_parser("promote", help="make a candidate current once its whole gallery is embedded (its HNSW "
                                        "and FAISS indexes are built first); running services follow")
    p.add_argument("id", nargs="?", type=int, default=None, help="the model (default: the newest candidate)")
    p.add_argument("--force", action="store_true", help="promote although images lack its embedding (says how many)")
    p.set_defaults(func=cmd_models)
    r = msub.add_parser("rollback", help="make current again the model the last promotion replaced")
    r.add_argument("--force", action="store_true", help="even if images ingested since lack its embedding")
    r.set_defaults(func=cmd_models)
    i = msub.add_parser("import", help="register a frozen ONNX encoder (a model validated elsewhere); workers embed "
                                       "with it through ONNX Runtime, and it is a candidate like a trained model")
    i.add_argument("file", help="the .onnx file: one (batch, channels, height, width) float input, one vector out")
    i.add_argument("--name", required=True, help="the model's name in `medsim models`")
    i.add_argument("--input-size", type=int, default=None, metavar="N",
                   help="its input size in px (default: the size fixed in the file)")
    i.add_argument("--channels", type=int, choices=[1, 3], default=None,
                   help="channels its input takes (default: the file's, else 3)")
    i.add_argument("--mean", default=None, metavar="M", help="per-channel mean on [0, 1] pixels, one number or one "
                                                             "per channel (default ImageNet's 0.485,0.456,0.406)")
    i.add_argument("--std", default=None, metavar="S", help="per-channel std (default ImageNet's 0.229,0.224,0.225)")
    i.add_argument("--promote-when-ready", action="store_true",
                   help="make it current as soon as the workers have embedded its whole gallery")
    i.set_defaults(func=cmd_import)
    c = msub.add_parser("compare", help="every model (or those named) by dataset: mAP@5, ACC@1, ECE, embedding "
                                        "coverage, checkpoint size, input size, embedding time per image")
    c.add_argument("ids", nargs="*", type=int, metavar="ID", help="models to compare (default: every model on file)")
    c.add_argument("--no-timing", action="store_true", help="leave out the embedding time (it loads every model)")
    c.add_argument("--threads", type=int, default=1, help="CPU threads the embedding time is measured on (default 1)")
    c.set_defaults(func=cmd_compare)
