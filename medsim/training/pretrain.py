"""Self-supervised contrastive pre-training before the supervised stage (SimCLR's NT-Xent
loss, Chen et al. 2020), an option of `medsim train` (--pretrain-epochs).

No label is read: two strongly augmented views of each image are pulled together and every
other image of the batch pushed away. The images are the train and val splits only (fit
passes them; test images never reach training). As in SimCLR, a small projection head
carries the loss and is dropped afterwards: the supervised Siamese stage starts from the
network's own embedding, the layer before the head.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medsim.model import network
from medsim.training import augment

# Views stronger than the supervised stage's: SimCLR learns what the augmentations leave
# unchanged, and mild ones make the task trivial (a view finds its twin by brightness).
VIEW = {"degrees": 25.0, "scale": 0.25, "shift_px": 4.0, "jitter": 0.3}


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """The normalised-temperature cross entropy: for each of the 2n views, its twin is the
    right answer among the other 2n - 1."""
    n = len(z1)
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))  # a view is not its own twin
    twin = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, twin)


def pretrain(net: nn.Module, x: np.ndarray, epochs: int, seed: int, device, batch_size: int = 256,
             lr: float = 3e-3, temperature: float = 0.2, log=print) -> list[dict]:
    """Train net in place on images x (the uint8 cache, (N, S, S, 3); labels unused) -> one row
    per epoch. Floats are made one batch at a time, so memory stays that of the cache."""
    dim = net.cfg.embedding_dim
    head = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim)).to(device)
    params = list(net.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    steps = max(1, len(x) // batch_size)  # whole batches: a last batch of 3 is a poor contrast
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps, pct_start=0.1)
    rng = np.random.default_rng(seed + 7)
    gen = torch.Generator().manual_seed(seed + 11)
    history = []
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        net.train()
        head.train()
        order = rng.permutation(len(x))
        losses = []
        for s in range(steps):
            batch = network.to_input(x[order[s * batch_size : (s + 1) * batch_size]])
            if next(net.parameters()).is_contiguous(memory_format=torch.channels_last) and batch.shape[-1] > 28:
                batch = batch.contiguous(memory_format=torch.channels_last)
            v1 = augment.augment(batch, "affine", gen, **VIEW).to(device, non_blocking=True)
            v2 = augment.augment(batch, "affine", gen, **VIEW).to(device, non_blocking=True)
            loss = nt_xent(head(net(v1)), head(net(v2)), temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        row = {"epoch": epoch, "loss": float(np.mean(losses)), "seconds": time.perf_counter() - t0}
        history.append(row)
        log(f"pretrain {epoch:3d}  NT-Xent {row['loss']:.4f}  {row['seconds']:.1f}s")
    return history
