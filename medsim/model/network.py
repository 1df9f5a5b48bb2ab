"""The Siamese embedding network, its contrastive loss, and checkpoints.

A Siamese network is one embedding CNN applied to both images of a pair (shared
weights); similarity is the Euclidean distance between the two embeddings.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import asdict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from medsim.errors import DataRefused
from medsim.model.config import ModelConfig


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def check_input(x: torch.Tensor, s: int) -> torch.Tensor:
    """Inputs come at the model's size: resizing is medsim.images' job (one filter for
    every path), never the network's (an imported encoder's either)."""
    if x.ndim != 4 or x.shape[1] != 3 or x.shape[-2:] != (s, s):
        raise ValueError(f"the network takes (batch, 3, {s}, {s}) inputs, got {tuple(x.shape)}: "
                         f"resize with medsim.images.model_input first")
    return x


class EmbeddingNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.arch == "seed":
            c1, c2 = cfg.widths
            self.body = nn.Sequential(
                nn.BatchNorm2d(3),
                nn.Conv2d(3, c1, 5), nn.Tanh(), nn.AvgPool2d(2),
                nn.Conv2d(c1, c2, 5), nn.Tanh(), nn.AvgPool2d(2),
                nn.Conv2d(c2, cfg.embedding_dim, 1),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Tanh(),
            )
        elif cfg.arch == "convnet":
            if cfg.embedding_dim % cfg.members:
                raise ValueError(f"embedding_dim {cfg.embedding_dim} is not a multiple of members {cfg.members}")
            bodies = [_convnet(cfg.widths, cfg.embedding_dim // cfg.members) for _ in range(cfg.members)]
            self.body = bodies[0] if cfg.members == 1 else _Members(bodies)
        elif cfg.arch == "resnet18":
            if cfg.members != 1:
                raise ValueError("the resnet preset is one network (members=1)")
            self.body = _resnet18(cfg.embedding_dim)
        else:
            raise ValueError(f"unknown arch {cfg.arch!r}")

    def check_input(self, x: torch.Tensor) -> torch.Tensor:
        return check_input(x, self.cfg.image_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (batch, 3, S, S) float in [-1, 1] -> (batch, embedding_dim)
        x = self.check_input(x)
        z = self.body(x)
        if self.cfg.tta_flip and not self.training:
            z = (z + self.body(x.flip(-1))) / 2
        return F.normalize(z, dim=1) if self.cfg.normalize else z

    def parts(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Training: each member's own normalised embedding (the loss applies to each), or
        the one embedding of a single network."""
        if self.cfg.members == 1:
            return [self(x)]
        return [F.normalize(m(self.check_input(x)), dim=1) for m in self.body.members]


class ImportedNet(nn.Module):
    """An imported ONNX encoder (medsim/model/imported.py) where a torch module is expected:
    evaluation, calibration, training a head on its features, explanations. The forward
    pass is ONNX Runtime's, so there are no gradients (explain.method_for: occlusion)."""

    differentiable = False

    def __init__(self, rt):
        super().__init__()
        self.rt, self.cfg = rt, rt.cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x01 = ((check_input(x, self.cfg.image_size).detach().float().cpu() + 1) / 2).numpy()  # to_input's [-1, 1] back to [0, 1]
        return torch.from_numpy(self.rt.embed_unit(x01)).to(x.device)

    def parts(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self(x)]


def _convnet(widths, dim: int) -> nn.Sequential:
    w1, w2, w3 = widths
    return nn.Sequential(
        *_conv_bn_relu(3, w1), *_conv_bn_relu(w1, w1), nn.MaxPool2d(2),
        *_conv_bn_relu(w1, w2), *_conv_bn_relu(w2, w2), nn.MaxPool2d(2),
        *_conv_bn_relu(w2, w3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(w3, dim),
    )


def _resnet18(dim: int) -> nn.Module:
    """torchvision's ResNet-18 from scratch (weights=None: nothing is downloaded), its own
    global average pool, and a linear projection head to dim in place of the classifier.
    (batch, 3, S, S) -> stem and four stages, S / 32 -> avgpool (batch, 512) -> (batch, dim)"""
    from torchvision.models import resnet18

    body = resnet18(weights=None)
    body.fc = nn.Linear(body.fc.in_features, dim)
    return body


class _Members(nn.Module):
    """An ensemble inside one model: independently initialised networks whose normalised
    embeddings are concatenated (each trained with its own contrastive loss), so their
    errors average out in every distance. Scaled by 1/sqrt(n): the result is unit length."""

    def __init__(self, bodies: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(bodies)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.normalize(m(x), dim=1) for m in self.members], 1) / len(self.members) ** 0.5


def to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) or (N, H, W, C in {1, 3}) -> float (N, 3, H, W) in [-1, 1].

    Grey images are repeated to 3 channels so every subset shares one network.
    """
    images = np.ascontiguousarray(images)
    if not images.flags.writeable:  # e.g. np.frombuffer over bytes from Postgres
        images = images.copy()
    x = torch.from_numpy(images)
    if x.ndim == 3:
        x = x.unsqueeze(-1)
    if x.shape[-1] == 1:
        x = x.expand(*x.shape[:-1], 3)
    if x.shape[-1] != 3:
        raise ValueError(f"expected 1 or 3 channels, got {x.shape[-1]}")
    return x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def pair_distance(za: torch.Tensor, zb: torch.Tensor) -> torch.Tensor:
    # (batch, dim), (batch, dim) -> (batch,); the epsilon keeps the gradient finite at d=0
    return torch.sqrt(((za - zb) ** 2).sum(1) + 1e-12)


def contrastive_loss(d: torch.Tensor, same: torch.Tensor, margin: float) -> torch.Tensor:
    """Hadsell, Chopra & LeCun (2006): pull similar pairs (same=1) together, push
    dissimilar ones (same=0) at least `margin` apart; zero once they are."""
    same = same.float()
    return (same * d.pow(2) + (1 - same) * F.relu(margin - d).pow(2)).mean() / 2


def batch_contrastive_loss(z: torch.Tensor, key: torch.Tensor, dataset: torch.Tensor, margin: float,
                           dataset_margin: float, pos_margin: float = 0.0,
                           grade: torch.Tensor | None = None) -> torch.Tensor:
    """The same contrastive loss over every pair in a batch, with online hard-negative mining.

    z: (B, dim) embeddings; key: (B,) diagnosis ids (subset and label); dataset: (B,) subset
    ids. Positives (same key) are pulled within `pos_margin`; a negative from the same subset
    is pushed `margin` away, one from another subset `dataset_margin` away (larger, so one
    model separates subsets by more than diagnoses within a subset). Each term is the mean
    over the pairs that still violate their margin, so the easy majority of a batch's
    B^2 / 2 pairs does not dilute the hard ones. `grade` (B,) optionally scales a
    same-subset negative's margin by how far apart two ordinal grades are (-1: no grade).
    """
    d = torch.cdist(z, z).clamp_min(1e-6)  # clamp: sqrt's gradient at 0 is infinite
    same_key = key[:, None] == key[None, :]
    same_ds = dataset[:, None] == dataset[None, :]
    upper = torch.ones_like(same_key).triu(1)
    pos = same_key & upper
    neg = ~same_key & upper
    m = torch.where(same_ds, torch.full_like(d, margin), torch.full_like(d, dataset_margin))
    if grade is not None:
        g = grade.float()
        graded = same_ds & (g[:, None] >= 0) & (g[None, :] >= 0)
        gap = (g[:, None] - g[None, :]).abs()
        # adjacent grades: half the margin; two or more apart: the full margin
        m = torch.where(graded, margin * torch.clamp(0.5 * gap, max=1.0), m)
    pos_l = F.relu(d[pos] - pos_margin).pow(2)
    neg_l = F.relu(m[neg] - d[neg]).pow(2)

    def active_mean(v: torch.Tensor) -> torch.Tensor:
        live = v > 0
        return v[live].mean() if live.any() else v.sum() * 0

    return (active_mean(pos_l) + active_mean(neg_l)) / 2


@torch.inference_mode()
def embed(model: EmbeddingNet, images: np.ndarray, batch_size: int | None = None, device="cpu") -> np.ndarray:
    """uint8 images -> float32 (N, dim) embeddings, in batches, no gradients."""
    model.eval()
    batch_size = batch_size or model.cfg.inference_batch(device)
    out = []
    for i in range(0, len(images), batch_size):
        out.append(model(to_input(images[i : i + batch_size]).to(device)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.cfg.embedding_dim), np.float32)


# ------------------------------------------------------------------ checkpoints
def save_checkpoint(model: EmbeddingNet, extra: dict | None = None) -> tuple[bytes, str]:
    """-> (bytes, sha256). The config travels inside, so the bytes alone rebuild the model."""
    buf = io.BytesIO()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"model_config": asdict(model.cfg), "state_dict": state, "extra": extra or {}}, buf)
    data = buf.getvalue()
    return data, hashlib.sha256(data).hexdigest()


def load_checkpoint(data: bytes, expected_sha256: str | None = None, device="cpu") -> EmbeddingNet:
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise DataRefused("checkpoint sha256 does not match the registry; refusing to load it")
    # weights_only: a checkpoint is data, never code
    ck = torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    model = EmbeddingNet(ModelConfig.from_dict(ck["model_config"]))
    model.load_state_dict(ck["state_dict"])
    return model.to(device).eval()
