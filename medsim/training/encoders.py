"""Encoders medsim did not train: `medsim models import FILE.onnx` registers one, and
`medsim train --on MODEL` trains a small contrastive head on its frozen features.

The head is the Siamese objective of every medsim model (the contrastive loss over a
P x K batch's pairs, network.batch_contrastive_loss) on features computed once: the
encoder never runs during training, so a head trains in seconds to minutes whatever the
encoder costs, and the epoch kept is the one with the best validation mAP@5, as fit()
keeps. Why a two-layer MLP and not a linear map: a linear head on L2-normalised features
can only rotate and scale the encoder's cosine geometry; one hidden layer can pull apart
what the encoder put together (the SimCLR projection head's shape, reversed).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from medsim import registry
from medsim.errors import BadArgument, DataRefused
from medsim.model import imported

HIDDEN, OUT = 256, 64
MARGIN = 1.0  # between diagnoses, as medsim's own networks (ModelConfig.margin)


def register_and_place(conn, register, promote_when_ready: bool, log) -> int:
    """registry.register_and_place for a model made here, saying where it went."""
    mid, current = registry.register_and_place(conn, register, promote_when_ready=promote_when_ready, log=log)
    if current:
        log(f"model {mid} is the current model")
    return mid


MAX_NAME = 100


def check_name(name: str) -> str:
    """A model's name is one printed line of `medsim models` and the page: some text, no
    line breaks or control characters, not a page long."""
    if not name.strip() or not name.isprintable() or len(name) > MAX_NAME:
        raise BadArgument(f"--name must be 1-{MAX_NAME} printable characters on one line, got {name[:40]!r}"
                          + ("..." if len(name) > 40 else ""))
    return name.strip()


def import_encoder(conn, path: str | Path, *, name: str, input_size: int | None = None, channels: int | None = None,
                   mean=None, std=None, promote_when_ready: bool = False, log=print) -> int:
    """Check an ONNX file (imported.inspect) and register it -> its model id."""
    name = check_name(name)
    onnx_bytes = imported.read_file(path)
    cfg = imported.inspect(onnx_bytes, input_size=input_size, channels=channels, mean=mean, std=std)
    blob, sha = imported.pack(onnx_bytes)
    log(f"{imported.file_name(path)}: {imported.describe(cfg)}")
    return register_and_place(conn, lambda candidate, promote: registry.register_bytes(
        conn, cfg, blob, sha, name=name, mode="imported", datasets=[],
        train_config={"imported_from": imported.file_name(path), "file_sha256": hashlib.sha256(onnx_bytes).hexdigest()},
        candidate=candidate, promote_when_ready=promote), promote_when_ready, log)


def train_head(conn, encoder_ref, tcfg, *, name: str | None = None, promote_when_ready: bool = False,
               log=print) -> int:
    """`medsim train --on MODEL`: a contrastive head on an imported encoder's features ->
    the new model's id (the same ONNX bytes, the head beside them)."""
    import torch

    from medsim.model import network
    from medsim.training import data, evaluate, train

    row = registry.get(conn, encoder_ref)
    if row.config.get("arch") != "onnx":
        raise BadArgument(f"model {row.id} is medsim's own network; --on takes an imported encoder "
                          f"(`medsim models import FILE.onnx --name NAME`): train medsim's network with `medsim train`")
    encoder = row.load(conn)
    if encoder.rt.head is not None:
        raise BadArgument(f"model {row.id} already has a head; train on the encoder it was made from")
    size = encoder.cfg.image_size
    tr = data.load_split(conn, ["train"], tcfg.flags, tcfg.image_size, size)
    va = data.load_split(conn, ["val"], tcfg.flags, tcfg.image_size, size)
    if not len(tr) or not len(va):
        raise BadArgument("--on needs labelled train and val images of the datasets asked")
    t0 = time.perf_counter()
    (tr, ftr), (va, fva) = (_finite(s, _features(encoder.rt, s.images), what, row.id, log)
                            for s, what in ((tr, "train"), (va, "val")))
    log(f"features of {len(tr)} train and {len(va)} val images from model {row.id} in "
        f"{time.perf_counter() - t0:.0f}s ({ftr.shape[1]}-d)")
    torch.manual_seed(tcfg.seed)
    rng = np.random.default_rng(tcfg.seed)
    head = torch.nn.Sequential(torch.nn.Linear(ftr.shape[1], HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, OUT))
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=tcfg.weight_decay)
    keys, ds = torch.as_tensor(tr.label_keys), torch.as_tensor(tr.dataset_ids)
    x = torch.as_tensor(ftr)
    best, best_state = -1.0, None
    for epoch in range(1, tcfg.epochs + 1):
        head.train()
        for idx in train.pk_batches(tr.label_keys, tcfg.per_class, tcfg.steps_per_epoch, rng):
            z = torch.nn.functional.normalize(head(x[idx]), dim=1)
            loss = network.batch_contrastive_loss(z, keys[idx], ds[idx], MARGIN,
                                                  tcfg.dataset_margin or 1.4)
            opt.zero_grad()
            loss.backward()
            opt.step()
        state = _numpy(head)
        score = _val_map(state, fva, va, ftr, tr, evaluate)
        if score > best:
            best, best_state, best_epoch = score, state, epoch
    if best_state is None or not all(np.isfinite(v).all() for v in best_state.values()):
        raise DataRefused(f"the head on model {row.id}'s features did not train (no epoch gave a finite "
                          f"validation score): nothing stored")
    seconds = time.perf_counter() - t0
    cfg = replace(encoder.cfg, preset="onnx+head", embedding_dim=OUT)
    blob, sha = imported.pack(encoder.rt.onnx, best_state)
    flags = sorted({tr.flags[int(d)] for d in np.unique(tr.dataset_ids)})
    log(f"a {HIDDEN}-{OUT} contrastive head on model {row.id}'s features: best epoch {best_epoch} "
        f"(val mAP@5 {100 * best:.1f}), {seconds:.0f}s")
    return register_and_place(conn, lambda candidate, promote: registry.register_bytes(
        conn, cfg, blob, sha, name=name or f"{row.name}+head", mode=tcfg.mode, datasets=flags,
        train_config={"on_model": row.id, "epochs": tcfg.epochs, "steps_per_epoch": tcfg.steps_per_epoch,
                      "per_class": tcfg.per_class, "seed": tcfg.seed, "flags": flags},
        candidate=candidate, promote_when_ready=promote, train_seconds=seconds, best_epoch=best_epoch),
        promote_when_ready, log)


def _features(rt, images: np.ndarray, chunk: int = 256) -> np.ndarray:
    return np.concatenate([rt.features(imported.to_unit(images[i:i + chunk]))
                           for i in range(0, len(images), chunk)])


def _finite(split, feats: np.ndarray, what: str, model_id: int, log):
    """Leave out the images the encoder gives NaN or infinite values for (the workers do not
    embed them either): one would make every loss, and so the head's weights, NaN."""
    ok = np.isfinite(feats).all(axis=1)
    if ok.all():
        return split, feats
    if not ok.any():
        raise DataRefused(f"model {model_id} gives NaN or infinite values for every {what} image: no head to train")
    log(f"{int((~ok).sum())} {what} image(s) left out: model {model_id} gives NaN or infinite values for them")
    keep = replace(split, ids=split.ids[ok], dataset_ids=split.dataset_ids[ok], label_keys=split.label_keys[ok],
                   labels=[lab for lab, k in zip(split.labels, ok, strict=True) if k], images=split.images[ok])
    return keep, feats[ok]


def _numpy(head) -> dict:
    w1, w2 = head[0], head[2]
    return {"head_w1": w1.weight.detach().numpy().T.copy(), "head_b1": w1.bias.detach().numpy().copy(),
            "head_w2": w2.weight.detach().numpy().T.copy(), "head_b2": w2.bias.detach().numpy().copy()}


def _val_map(state, fva, va, ftr, tr, evaluate) -> float:
    zq, zb = imported.apply_head(fva, state), imported.apply_head(ftr, state)
    per = evaluate.literature(zq, va, zb, tr, "l2", intervals=False)
    return float(np.mean([m["map@5"] for m in per.values()])) if per else float("nan")
