"""Commands about models: train, evaluate, models (list, switch the current one)."""

from __future__ import annotations

from medsim.cli.common import MODEL, OUT_DIR, QUIET, connect
from medsim.errors import BadArgument

TRAIN_FIELDS = ("epochs", "sampler", "per_class", "steps_per_epoch", "pairs_per_epoch", "batch_size", "lr",
                "patience", "augment", "pretrain_epochs")


def cmd_train(args) -> int:
    from medsim.training import train

    try:
        given = {k: getattr(args, k) for k in TRAIN_FIELDS if getattr(args, k) is not None}
        tcfg = train.TrainConfig(mode=args.mode, preset=args.preset, seed=args.seed, flags=args.datasets,
                                 device=args.device, **given)
    except BadArgument as err:
        raise BadArgument(f"train: {err}") from None
    with connect(args) as conn:
        train.train(conn, tcfg, out_dir=args.out_dir, set_current=not args.no_set_current, progress=not args.quiet)
    return 0


def cmd_evaluate(args) -> int:
    from medsim.training import evaluate

    with connect(args) as conn:
        r = evaluate.evaluate(conn, args.model, device=args.device, exclude_leaked=args.exclude_leaked,
                              out_dir=args.out_dir)
    print(evaluate.format_table(r))
    print(f"stored as medsim.evaluations id {r['evaluation_id']}")
    return 0


def cmd_models(args) -> int:
    from medsim import registry

    with connect(args) as conn:
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


def register(sub) -> None:
    s = sub.add_parser("train", parents=[OUT_DIR, QUIET],
                       help="train the Siamese network and register it as the current model")
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
    s.add_argument("--pretrain-epochs", type=int, default=None, metavar="N",
                   help="N epochs of self-supervised contrastive pre-training (SimCLR) on the train and val "
                        "images, labels unused, before the supervised stage (default 0: none)")
    s.add_argument("--seed", type=int, default=0, help="random seed for pairs, init and augmentation")
    s.add_argument("--datasets", nargs="+", default=None, metavar="FLAG",
                   help="subsets to train on (default: every ingested one)")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to train")
    s.add_argument("--no-set-current", action="store_true", help="register without making it current")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("evaluate", parents=[MODEL, OUT_DIR],
                       help="pair verification and retrieval metrics, stored in Postgres")
    s.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run the model")
    s.add_argument("--exclude-leaked", action="store_true",
                   help="leave out test queries the latest `medsim audit` paired with a train/val image")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("models", help="list registered models; --set-current switches")
    s.add_argument("--set-current", type=int, default=None, metavar="ID", help="make model ID current")
    s.set_defaults(func=cmd_models)
