"""A training's loss and accuracy curves, as PNG files beside its outputs."""

from __future__ import annotations

from pathlib import Path


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
