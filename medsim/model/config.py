"""Model hyper-parameters: a typed dataclass saved inside every checkpoint, so inference
rebuilds the network from the checkpoint alone (nanoGPT's GPTConfig). No torch here:
the registry and the CLI read configs without paying for the torch import."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from medsim.errors import BadArgument


@dataclass(frozen=True)
class ModelConfig:
    preset: str = "default"
    arch: str = "convnet"  # "convnet" (ours), "seed" (the published notebook's) or "resnet18"
    image_size: int = 28  # network input size; other sizes are resized on the way in
    embedding_dim: int = 64
    widths: tuple[int, ...] = (16, 32, 64)
    normalize: bool = True  # L2-normalise embeddings: distances live in [0, 2]
    margin: float = 1.0  # contrastive margin, in embedding distance units
    # Test-time augmentation: an embedding is the mean of the image's and its mirror
    # image's (then normalised). Part of the model, so the worker, the CLI and the service
    # all embed the same way; it doubles the forward cost.
    tta_flip: bool = False
    members: int = 1  # networks in the model, each with embedding_dim / members outputs
    # An imported ONNX encoder (arch "onnx", medsim/model/imported.py): the channels its
    # input takes and the per-channel mean and std it was trained with, on [0, 1] pixels
    # (ImageNet's by default: what torchvision's and most foundation models' exports expect).
    channels: int = 3
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)

    def inference_batch(self, device: str = "cpu") -> int:
        """Images per forward pass at inference. On a CPU, batches whose first-layer
        activations outgrow the cache run slower per image (measured on 2 cores: the
        default net does 24k images/s at 64 and 12k at 256; the seed net at 128 px does
        1k at 4 and 0.5k at 256), so aim at ~4 MB of them; a GPU wants big batches."""
        if str(device).startswith("cuda"):
            return 1024 if self.arch != "resnet18" else 256
        if self.arch in ("resnet18", "onnx"):  # its stem: 64 channels at half the input size (an
            # imported encoder's is not known: a ResNet's is the common case)
            per_image = 4 * 64 * (self.image_size // 2) ** 2
        else:
            per_image = 4 * self.widths[0] * self.image_size**2  # float32 bytes
        return 2 ** max(0, round(math.log2(4 * 2**20 / per_image)))

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        d = {**d, "widths": tuple(d["widths"])}
        for k in ("mean", "std"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


PRESETS: dict[str, ModelConfig] = {
    # The notebook's network: BatchNorm, two 5x5 conv + tanh + average-pool stages
    # (16 -> 48 channels), a 1x1 projection to a 16-d tanh embedding, 128 px inputs.
    "seed": ModelConfig(preset="seed", arch="seed", image_size=128, embedding_dim=16,
                        widths=(16, 48), normalize=False, margin=1.0),
    # Ours: native 28 px, three conv stages (two 3x3 conv-BN-ReLU each), global average
    # pool, linear 64-d head, L2-normalised, flip test-time augmentation. Trains in a few
    # minutes on two CPU cores. (tta_flip is set here, not as the dataclass default, so
    # checkpoints saved before the field existed still load as they were trained.)
    "default": ModelConfig(tta_flip=True),
    # Above 28 px: torchvision's ResNet-18 built from scratch (no weights downloaded), its
    # global average pool, and a linear projection to the same 64-d L2-normalised embedding,
    # flip TTA as the default net. Why ResNet-18 and not a wider or deeper one: on 2 CPU
    # cores a training step of 48 images at 128 px takes seconds already (1.8 GFLOPs per
    # image forward at 224 px; ResNet-34 doubles that, ResNet-50 costs 2.3x with 4x the
    # activations), and an archive of a few hundred to a few thousand images gives a wider
    # net nothing to fill. The size is the archive's (train.resolve_input), not fixed here.
    "resnet": ModelConfig(preset="resnet", arch="resnet18", image_size=128, widths=(64, 128, 256, 512),
                          tta_flip=True),
}

# Network input sizes `medsim train --image-size` accepts: below 16 px a ResNet's five
# stride-2 stages leave nothing; above 512 px one step of a P x K batch outgrows memory.
MIN_INPUT, MAX_INPUT = 16, 512
# The default input size is the archive's stored size, capped by what trains in minutes:
# on 2 CPU cores a ResNet-18 epoch (40 steps of 48 images) takes ~1 min at 128 px, ~3 at 224.
SIZE_BUDGET = {"cpu": 128, "cuda": 224}


def preset_for_size(size: int) -> str:
    """The network for an input size: the native 28 px net at 28 (and below), ResNet-18 above."""
    return "default" if size <= 28 else "resnet"


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise BadArgument(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)
