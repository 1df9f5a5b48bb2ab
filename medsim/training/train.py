"""Train the Siamese network on pairs sampled from the train split in Postgres, validate
on the val split, early-stop on validation ROC AUC, and register the model.

Nothing is written until training completes: the model row, its checkpoint and every
epoch's history go in one transaction.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from medsim import registry
from medsim.errors import BadArgument
from medsim.queries import Q
from medsim.training import data, metrics, network
from medsim.training.config import PRESETS, preset
from medsim.training.pairs import sample_pairs


@dataclass
class TrainConfig:
    mode: str = "label"  # "label" or "dataset" (see medsim.pairs)
    preset: str = "default"  # a key of medsim.model.PRESETS
    epochs: int = 15
    pairs_per_epoch: int = 12000
    val_pairs: int = 2000
    batch_size: int = 128  # pairs per step (2x images through the network)
    lr: float = 3e-3
    weight_decay: float = 1e-4
    patience: int = 5  # epochs without val-AUC improvement before stopping
    seed: int = 0
    flags: list | None = None  # MedMNIST subsets to train on (default: all ingested)
    image_size: int = 28  # which ingested size to read
    augment: bool = True  # random horizontal flips
    device: str = "auto"

    def __post_init__(self):
        # checked here so a bad value fails before any data is read (epochs=0 used to end
        # in a TypeError while saving a checkpoint that was never made)
        for name in ("epochs", "pairs_per_epoch", "val_pairs", "batch_size", "patience", "image_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise BadArgument(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise BadArgument(f"lr must be positive, got {self.lr!r}")
        if self.mode not in ("label", "dataset"):
            raise BadArgument(f"mode must be 'label' or 'dataset', got {self.mode!r}")
        if self.preset not in PRESETS:
            raise BadArgument(f"unknown preset {self.preset!r}; choose from {', '.join(PRESETS)}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise BadArgument("--device cuda asked for, but torch sees no CUDA device")
    return torch.device(name)


def evaluate_pairs(model, x: torch.Tensor, a, b, same, margin: float, device) -> dict:
    """Loss, best-threshold accuracy and ROC AUC of fixed pairs over images x."""
    model.eval()
    with torch.inference_mode():
        step = model.cfg.inference_batch(str(device))
        z = torch.cat([model(x[i : i + step].to(device)) for i in range(0, len(x), step)])
        d = network.pair_distance(z[a], z[b])
        loss = network.contrastive_loss(d, torch.as_tensor(same, device=d.device), margin).item()
    d = d.cpu().numpy()
    t, acc = metrics.best_threshold(d, same)
    return {"loss": loss, "acc": acc, "auc": metrics.roc_auc(-d, same), "threshold": t}


def train(conn, tcfg: TrainConfig, out_dir: Path | str = "medsim_out", set_current: bool = True,
          progress: bool = True, log=print) -> int:
    from tqdm import tqdm

    device = resolve_device(tcfg.device)
    torch.manual_seed(tcfg.seed)
    cfg = preset(tcfg.preset)
    tr = data.load_split(conn, ["train"], tcfg.flags, tcfg.image_size)
    va = data.load_split(conn, ["val"], tcfg.flags, tcfg.image_size)
    flags = sorted({tr.flags[int(d)] for d in np.unique(tr.dataset_ids)})
    skipped = tr.skipped + va.skipped
    if skipped:
        log(data.describe_skipped(skipped))
    log(f"training {cfg.preset} ({tcfg.mode} mode) on {', '.join(flags)}: {len(tr)} train, "
        f"{len(va)} val images, device {device}")

    net = network.EmbeddingNet(cfg).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=tcfg.epochs)
    x_tr = network.to_input(tr.images)  # (N, 3, S, S), kept on the CPU; batches move to device
    x_va = network.to_input(va.images)
    va_a, va_b, va_same = sample_pairs(va.dataset_ids, va.label_keys, tcfg.val_pairs, tcfg.mode,
                                       seed=tcfg.seed + 1_000_003)
    history, best, best_state, bad = [], None, None, 0
    t_start = time.perf_counter()
    for epoch in range(1, tcfg.epochs + 1):
        t0 = time.perf_counter()
        a, b, same = sample_pairs(tr.dataset_ids, tr.label_keys, tcfg.pairs_per_epoch, tcfg.mode,
                                  seed=tcfg.seed * 7919 + epoch)
        net.train()
        gen = torch.Generator().manual_seed(tcfg.seed * 104729 + epoch)
        losses, correct = [], 0
        steps = range(0, len(a), tcfg.batch_size)
        for s in tqdm(steps, desc=f"epoch {epoch}/{tcfg.epochs}", unit="step", disable=not progress, leave=False):
            ia, ib = a[s : s + tcfg.batch_size], b[s : s + tcfg.batch_size]
            y = torch.as_tensor(same[s : s + tcfg.batch_size], device=device)
            x = torch.cat([x_tr[ia], x_tr[ib]])  # (2B, 3, S, S)
            if tcfg.augment:
                flip = torch.rand(len(x), generator=gen) < 0.5
                x[flip] = x[flip].flip(-1)
            za, zb = net(x.to(device, non_blocking=True)).chunk(2)
            d = network.pair_distance(za, zb)
            loss = network.contrastive_loss(d, y, cfg.margin)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            correct += ((d.detach() < cfg.margin / 2) == y.bool()).sum().item()
        sched.step()
        val = evaluate_pairs(net, x_va, va_a, va_b, va_same, cfg.margin, device)
        row = {"epoch": epoch, "train_loss": float(np.mean(losses)), "train_acc": correct / len(a),
               "val_loss": val["loss"], "val_acc": val["acc"], "val_auc": val["auc"],
               "seconds": time.perf_counter() - t0}
        history.append(row)
        log(f"epoch {epoch:3d}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}  "
            f"val loss {val['loss']:.4f} acc {val['acc']:.4f} auc {val['auc']:.4f}  {row['seconds']:.1f}s")
        # Val AUC, not val loss: it is what retrieval needs (ranking), and the contrastive
        # loss on 2,000 val pairs wobbled enough to stop runs at epoch 5 of 15.
        if best is None or val["auc"] > best["val_auc"] + 1e-5:
            best, best_state, bad = row, copy.deepcopy(net.state_dict()), 0
        else:
            bad += 1
            if bad >= tcfg.patience:
                log(f"early stop: val AUC has not improved for {bad} epochs (best epoch {best['epoch']})")
                break
    train_seconds = time.perf_counter() - t_start
    net.load_state_dict(best_state)
    with conn.transaction():
        model_id = registry.register(conn, net.cpu(), mode=tcfg.mode, datasets=flags,
                                     train_config={**asdict(tcfg), "skipped_images": [i for i, _ in skipped]},
                                     best_epoch=best["epoch"],
                                     best_val_loss=best["val_loss"], train_seconds=train_seconds)
        for row in history:
            conn.execute(Q.insert_epoch, {"model_id": model_id, **row})
    if set_current:
        registry.set_current(conn, model_id)
    paths = plot_curves(history, Path(out_dir) / f"model-{model_id}")
    log(f"model {model_id} registered ({train_seconds:.1f}s, best epoch {best['epoch']}); curves: "
        + ", ".join(map(str, paths)))
    return model_id


def plot_curves(history: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    ep = [h["epoch"] for h in history]
    paths = []
    for name, keys in (("loss", ("train_loss", "val_loss")), ("accuracy", ("train_acc", "val_acc"))):
        fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
        for k in keys:
            ax.plot(ep, [h[k] for h in history], marker="o", label=k.replace("_", " "))
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths
