"""Train the Siamese network on the train split in Postgres, choose the epoch on the val
split (retrieval mAP@5 of val queries against train, by default), and register the model.

The default recipe (measured step by step in bench/bench_quality.py): P x K batches with
the contrastive loss on every pair in the batch, hard negatives only, subsets pushed
further apart than diagnoses, affine and intensity augmentation, a one-cycle learning rate.

Nothing is written until training completes: the model row, its checkpoint and every
epoch's history go in one transaction.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from medsim import registry
from medsim.errors import BadArgument
from medsim.model import network
from medsim.model.config import PRESETS, preset, preset_for_size
from medsim.queries import Q
from medsim.training import augment, data, evaluate, metrics, pretrain, sizing
from medsim.training.curves import plot_curves
from medsim.training.pairs import sample_pairs


@dataclass
class TrainConfig:
    mode: str = "label"  # "label" or "dataset" (see medsim.pairs)
    # a key of config.PRESETS; None: chosen from the input size (28: "default", larger: "resnet")
    preset: str | None = "default"
    epochs: int = 40
    # sampler "pk": each step draws per_class images of every diagnosis (subset, label) and
    # uses every pair in the batch; an epoch is steps_per_epoch steps. "pairs": the
    # original independent balanced pairs, pairs_per_epoch of them, batch_size per step.
    sampler: str = "pk"
    per_class: int = 16
    steps_per_epoch: int = 40
    pairs_per_epoch: int = 12000
    val_pairs: int = 2000
    batch_size: int = 128  # pairs per step (2x images through the network)
    lr: float = 3e-3
    weight_decay: float = 1e-4
    # epochs without improvement of the selection score before stopping; None: run every
    # epoch (the pk sampler's one-cycle schedule is still at a high learning rate halfway,
    # where a noisy validation score stopped a run at epoch 17 with its best at 7)
    patience: int | None = None
    seed: int = 0
    flags: list | None = None  # MedMNIST subsets to train on (default: all ingested)
    image_size: int = 28  # which ingested MedMNIST size to read (archives: every size)
    # the network's input size, px (`medsim train --image-size`); None: the preset's own, or
    # with preset None the archive's stored size within a budget (training.sizing)
    input_size: int | None = None
    augment: str = "affine"  # "none", "flip", "affine" or "any_size" (medsim.training.augment)
    # pk: margin between subsets, larger than the model's margin between diagnoses within a
    # subset, so one model separates subsets first (the notebook's dataset-pair protocol)
    dataset_margin: float | None = 1.4
    pos_margin: float = 0.0  # pk: positives closer than this are left alone
    ordinal: bool = False  # pk: ordinal subsets' adjacent grades get half the margin
    # "val_map" (val queries vs train, label mAP@5) or "val_auc" (val pairs of the mode);
    # None: the mode's own score. In dataset mode val_map chose epoch 3 of 40 (a label
    # figure), and test dataset-pair accuracy fell from 99.5% to 99.22% (ties: below;
    # bench/bench_seed_protocol.py, docs/results.md)
    select_on: str | None = None
    ema: float = 0.0  # decay of an exponential moving average of the weights (0: none); the
    #                   average is what is validated and kept
    # epochs of self-supervised contrastive pre-training (medsim.training.pretrain) on the
    # train and val images, labels unused, before the supervised stage; 0: none
    pretrain_epochs: int = 0
    device: str = "auto"

    def __post_init__(self):
        # checked here so a bad value fails before any data is read (epochs=0 used to end
        # in a TypeError while saving a checkpoint that was never made)
        for name in ("epochs", "pairs_per_epoch", "val_pairs", "batch_size", "patience", "image_size",
                     "per_class", "steps_per_epoch"):
            if name == "patience" and self.patience is None:
                continue
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise BadArgument(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.pretrain_epochs, int) or self.pretrain_epochs < 0:
            raise BadArgument(f"pretrain_epochs must be 0 or a positive integer, got {self.pretrain_epochs!r}")
        if not self.lr > 0:
            raise BadArgument(f"lr must be positive, got {self.lr!r}")
        if self.mode not in ("label", "dataset"):
            raise BadArgument(f"mode must be 'label' or 'dataset', got {self.mode!r}")
        sizing.check_size(self.input_size)
        if self.preset is not None and self.preset not in PRESETS:
            raise BadArgument(f"unknown preset {self.preset!r}; choose from {', '.join(PRESETS)}")
        if self.sampler not in SAMPLERS:
            raise BadArgument(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.augment not in augment.KINDS:
            raise BadArgument(f"augment must be one of {augment.KINDS}, got {self.augment!r}")
        if self.select_on is None:
            self.select_on = "val_map" if self.mode == "label" else "val_auc"
        if self.select_on not in SELECT_ON:
            raise BadArgument(f"select_on must be one of {SELECT_ON}, got {self.select_on!r}")


SAMPLERS = ("pairs", "pk")
SELECT_ON = ("val_auc", "val_map")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise BadArgument("--device cuda asked for, but torch sees no CUDA device")
    return torch.device(name)


def _embed_all(model, x: np.ndarray, device) -> torch.Tensor:
    # x: the uint8 cache (N, S, S, 3); floats exist one inference batch at a time
    step = model.cfg.inference_batch(str(device))
    return torch.cat([model(_batch(x[i : i + step], device)) for i in range(0, len(x), step)])


def _batch(images: np.ndarray, device) -> torch.Tensor:
    # uint8 (B, S, S, 3) -> float (B, 3, S, S) on the device (channels-last: CHANNELS_LAST)
    x = network.to_input(images).to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if CHANNELS_LAST and x.shape[-1] > 28 else x


# Channels-last for inputs above 28 px (the ResNet), off: measured slower on this 2-core CPU
# (a ResNet-18 step of 48 images, forward, backward and AdamW: 3.2 s contiguous vs 6.6 s
# channels-last at 64 px, 7.0 vs 8.2 s at 128 px; torch 2.14's oneDNN convolutions).
CHANNELS_LAST = False


def evaluate_pairs(model, x: torch.Tensor, a, b, same, margin: float, device) -> dict:
    """Loss, best-threshold accuracy and ROC AUC of fixed pairs over images x."""
    model.eval()
    with torch.inference_mode():
        z = _embed_all(model, x, device)
        d = network.pair_distance(z[a], z[b])
        loss = network.contrastive_loss(d, torch.as_tensor(same, device=d.device), margin).item()
    d = d.cpu().numpy()
    t, acc = metrics.best_threshold(d, same)
    return {"loss": loss, "acc": acc, "auc": metrics.roc_auc(-d, same), "threshold": t}


def val_retrieval(model, x_va, va: data.Split, x_tr, tr: data.Split, device) -> float:
    """Mean over subsets of the literature's mAP@5, val queries against the same subset's
    train split (evaluate.literature): the figure the model is for, measured on
    validation, never on test."""
    model.eval()
    with torch.inference_mode():
        zq, zb = _embed_all(model, x_va, device).cpu().numpy(), _embed_all(model, x_tr, device).cpu().numpy()
    per_subset = evaluate.literature(zq, va, zb, tr, "l2", intervals=False)
    return float(np.mean([m["map@5"] for m in per_subset.values()])) if per_subset else float("nan")


def pk_batches(label_keys: np.ndarray, per_class: int, steps: int, rng: np.random.Generator):
    """steps batches of per_class images of every diagnosis (without replacement within a
    batch where a diagnosis has enough images): every batch holds positives for every
    image and negatives of every kind, whatever the subsets' sizes."""
    groups = [np.flatnonzero(label_keys == k) for k in np.unique(label_keys)]
    for _ in range(steps):
        yield np.concatenate([rng.choice(g, per_class, replace=len(g) < per_class) for g in groups])


def fit(tr: data.Split, va: data.Split, tcfg: TrainConfig, device=None, progress: bool = False, log=print,
        model_overrides: dict | None = None):
    """Train one network on in-memory splits -> (net on the CPU, history rows, best row).

    The selection score (tcfg.select_on) is measured on val after every epoch; the best
    epoch's weights are returned."""
    from tqdm import tqdm

    device = device or resolve_device(tcfg.device)
    torch.manual_seed(tcfg.seed)
    rng = np.random.default_rng(tcfg.seed)
    size = tcfg.input_size or tr.images.shape[1]
    sized = {"image_size": tcfg.input_size} if tcfg.input_size else {}
    cfg = preset(tcfg.preset or preset_for_size(size), **{**sized, **(model_overrides or {})})
    net = network.EmbeddingNet(cfg).to(device)
    if CHANNELS_LAST and cfg.image_size > 28:
        net = net.to(memory_format=torch.channels_last)
    # the uint8 cache (N, S, S, 3) as load_split decoded it, once; float batches are made per step
    x_tr, x_va = tr.images, va.images
    if tcfg.pretrain_epochs:  # train + val images, labels unused; never test
        pretrain.pretrain(net, np.concatenate([x_tr, x_va]), tcfg.pretrain_epochs, tcfg.seed, device, log=log)
    opt = torch.optim.AdamW(net.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    steps_per_epoch = (tcfg.steps_per_epoch if tcfg.sampler == "pk"
                       else -(-tcfg.pairs_per_epoch // tcfg.batch_size))
    # per-step cosine decay: the pk sampler's epochs are short, so a per-epoch step is coarse
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=tcfg.lr, total_steps=tcfg.epochs * steps_per_epoch,
                                                pct_start=0.1) if tcfg.sampler == "pk" else \
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=tcfg.epochs)
    key_tr = torch.as_tensor(tr.label_keys)
    ds_tr = torch.as_tensor(tr.dataset_ids)
    grade_tr = torch.as_tensor(tr.grades) if tcfg.ordinal else None
    margin = cfg.margin
    dataset_margin = tcfg.dataset_margin if tcfg.dataset_margin is not None else margin
    va_a, va_b, va_same = sample_pairs(va.dataset_ids, va.label_keys, tcfg.val_pairs, tcfg.mode,
                                       seed=tcfg.seed + 1_000_003)
    history, best, best_state, bad = [], None, None, 0
    ema = (torch.optim.swa_utils.AveragedModel(net, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(tcfg.ema),
                                               use_buffers=True) if tcfg.ema > 0 else None)
    for epoch in range(1, tcfg.epochs + 1):
        t0 = time.perf_counter()
        net.train()
        gen = torch.Generator().manual_seed(tcfg.seed * 104729 + epoch)
        losses, correct, seen = [], 0, 0
        if tcfg.sampler == "pk":
            batches = pk_batches(tr.label_keys if tcfg.mode == "label" else tr.dataset_ids,
                                 tcfg.per_class, steps_per_epoch, rng)
        else:
            a, b, same = sample_pairs(tr.dataset_ids, tr.label_keys, tcfg.pairs_per_epoch, tcfg.mode,
                                      seed=tcfg.seed * 7919 + epoch)
            batches = (np.concatenate([a[s : s + tcfg.batch_size], b[s : s + tcfg.batch_size]])
                       for s in range(0, len(a), tcfg.batch_size))
        for idx in tqdm(batches, total=steps_per_epoch, desc=f"epoch {epoch}/{tcfg.epochs}", unit="step",
                        disable=not progress, leave=False):
            x = augment.augment(network.to_input(x_tr[idx]), tcfg.augment, gen)
            x = x.contiguous(memory_format=torch.channels_last) if CHANNELS_LAST and x.shape[-1] > 28 else x
            if tcfg.sampler == "pk":
                parts = net.parts(x.to(device, non_blocking=True))
                z = parts[0].detach() if len(parts) == 1 else torch.cat(parts, 1).detach() / len(parts) ** 0.5
                key = key_tr[idx] if tcfg.mode == "label" else ds_tr[idx]
                loss = sum(network.batch_contrastive_loss(
                    p, key.to(device), ds_tr[idx].to(device), margin, dataset_margin, tcfg.pos_margin,
                    None if grade_tr is None else grade_tr[idx].to(device)) for p in parts) / len(parts)
                with torch.no_grad():  # pair accuracy at half the margin, over the batch's pairs
                    dd = torch.cdist(z, z)
                    sk = key[:, None].to(device) == key[None, :].to(device)
                    off = ~torch.eye(len(idx), dtype=torch.bool, device=device)
                    correct += ((dd < margin / 2) == sk)[off].sum().item()
                    seen += int(off.sum())
            else:
                za, zb = net(x.to(device, non_blocking=True)).chunk(2)
                n = len(za)
                y = torch.as_tensor(same[seen : seen + n], device=device)  # seen: pairs so far
                d = network.pair_distance(za, zb)
                loss = network.contrastive_loss(d, y, margin)
                correct += ((d.detach() < margin / 2) == y.bool()).sum().item()
                seen += n
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if tcfg.sampler == "pk":
                sched.step()
            if ema is not None:
                ema.update_parameters(net)
            losses.append(loss.item())
        if tcfg.sampler != "pk":
            sched.step()
        kept = net if ema is None else ema.module  # what is validated is what is kept
        val = evaluate_pairs(kept, x_va, va_a, va_b, va_same, margin, device)
        row = {"epoch": epoch, "train_loss": float(np.mean(losses)), "train_acc": correct / max(seen, 1),
               "val_loss": val["loss"], "val_acc": val["acc"], "val_auc": val["auc"],
               "seconds": time.perf_counter() - t0}
        if tcfg.select_on == "val_map":
            row["val_map"] = val_retrieval(kept, x_va, va, x_tr, tr, device)
        history.append(row)
        log(f"epoch {epoch:3d}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}  "
            f"val loss {val['loss']:.4f} acc {val['acc']:.4f} auc {val['auc']:.4f}"
            + (f" mAP@5 {row['val_map']:.4f}" if "val_map" in row else "") + f"  {row['seconds']:.1f}s"
            + f"  ETA {_clock(np.mean([h['seconds'] for h in history]) * (tcfg.epochs - epoch))}")
        # A ranking score, not val loss: the contrastive loss on 2,000 val pairs wobbled
        # enough to stop runs at epoch 5 of 15. val_map is the retrieval figure itself
        # (on val queries); val_auc ranks pairs, which mixes subsets with diagnoses.
        # A tie keeps the later epoch (more steps, at the one-cycle's lower rate): dataset
        # pairs' AUC is 1.0000 from epoch 1, and keeping the first epoch that reached it gave
        # 99.12% test pair accuracy where the protocol reached 99.5%
        score = row[tcfg.select_on]
        improved = best is None or score > best[tcfg.select_on] + 1e-5
        if improved or score >= best[tcfg.select_on] - 1e-5:
            best, best_state = row, copy.deepcopy(kept.state_dict())
        bad = 0 if improved else bad + 1  # a tie is no improvement for patience
        if tcfg.patience is not None and bad >= tcfg.patience:
            log(f"early stop: val {tcfg.select_on} has not improved for {bad} epochs "
                f"(best epoch {best['epoch']})")
            break
    net.load_state_dict(best_state)
    return net.cpu(), history, best


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def train(conn, tcfg: TrainConfig, out_dir: Path | str = "medsim_out", set_current: bool | None = None,
          progress: bool = True, log=print, candidate: bool = True, promote_when_ready: bool = False) -> int:
    """Train and register a model -> its id. set_current None (the default): current at once
    only when there is no current model; otherwise a candidate (when `candidate`), which
    the workers embed and `medsim models promote` makes current, so searches never go
    down for a retrain (search/promotion.py). True: current now (its gallery then
    embeds while searches see only what is done)."""
    device = resolve_device(tcfg.device)
    name, size, warning = sizing.resolve(tcfg.preset, tcfg.input_size,
                                         sizing.stored_sides(conn, tcfg.flags, tcfg.image_size), str(device))
    if warning:
        log(f"warning: {warning}")
    # the run as resolved; the recipe is stored as asked (the model's config records the size),
    # so registry.reusable matches a recipe that asks the same way
    run = replace(tcfg, preset=name, input_size=size)
    # the network's input size; tcfg.image_size: which MedMNIST size to read
    tr = data.load_split(conn, ["train"], tcfg.flags, tcfg.image_size, size)
    va = data.load_split(conn, ["val"], tcfg.flags, tcfg.image_size, size)
    flags = sorted({tr.flags[int(d)] for d in np.unique(tr.dataset_ids)})
    skipped = tr.skipped + va.skipped
    if skipped:
        log(data.describe_skipped(skipped))
    log(f"training {name} at {size} px ({tcfg.mode} mode) on {', '.join(flags)}: {len(tr)} train, "
        f"{len(va)} val images, device {device}")
    t_start = time.perf_counter()
    net, history, best = fit(tr, va, run, device, progress, log)
    train_seconds = time.perf_counter() - t_start
    def register(as_candidate: bool, promote: bool) -> int:
        model_id = registry.register(conn, net, mode=tcfg.mode, datasets=flags,
                                     train_config={**asdict(tcfg), "skipped_images": [i for i, _ in skipped]},
                                     best_epoch=best["epoch"], best_val_loss=best["val_loss"],
                                     train_seconds=train_seconds, candidate=as_candidate, promote_when_ready=promote)
        for row in history:
            conn.execute(Q.insert_epoch, {"model_id": model_id, **{k: v for k, v in row.items() if k != "val_map"}})
        return model_id

    model_id, _ = registry.register_and_place(conn, register, current=set_current, candidate=candidate,
                                              promote_when_ready=promote_when_ready, log=log)
    paths = plot_curves(history, Path(out_dir) / f"model-{model_id}")
    log(f"model {model_id} registered ({train_seconds:.1f}s, best epoch {best['epoch']}); curves: "
        + ", ".join(map(str, paths)))
    return model_id
