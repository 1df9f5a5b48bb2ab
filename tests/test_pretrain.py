"""Self-supervised pre-training (medsim.training.pretrain): the loss does what it says, it
sees train and val images only, and it lowers its own loss before the supervised stage."""

from __future__ import annotations

import math

import pytest
import torch

from medsim import cli
from medsim.training import data, pretrain, train
from tests.helpers import ingest_synth


def test_nt_xent_prefers_each_view_s_own_twin():
    z = torch.eye(8)[:6] * 5  # six distinct directions
    aligned = pretrain.nt_xent(z, z.clone(), 0.2)
    shuffled = pretrain.nt_xent(z, z[[1, 2, 3, 4, 5, 0]], 0.2)
    # log(1 + 10 e^-5) when every twin is found: the floor at temperature 0.2; a wrong pairing pays
    assert float(aligned) == pytest.approx(math.log1p(10 * math.exp(-5)), abs=1e-4) and float(shuffled) > 2


def test_pretraining_reads_train_and_val_only_and_lowers_its_loss(conn, synth_dir, monkeypatch):
    ingest_synth(conn, synth_dir)
    tr, va, te = (data.load_split(conn, [s]) for s in ("train", "val", "test"))
    seen, real = [], pretrain.pretrain

    def spy(net, x, epochs, *args, **kwargs):
        seen.append(len(x))
        before = [p.detach().clone() for p in net.parameters()]
        history = real(net, x, epochs, *args, **kwargs)
        seen.append(any(not torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True)))
        seen.append(history)
        return history

    monkeypatch.setattr(pretrain, "pretrain", spy)
    cfg = train.TrainConfig(epochs=1, steps_per_epoch=2, per_class=4, val_pairs=40, pretrain_epochs=4,
                            device="cpu", seed=0)
    train.fit(tr, va, cfg, "cpu", log=lambda *a: None)
    n, changed, history = seen
    assert n == len(tr) + len(va) and len(te) > 0  # the test split never reaches training
    assert changed and len(history) == 4
    assert history[-1]["loss"] < history[0]["loss"] - 0.1


def test_bad_pretrain_epochs_is_one_sentence(capsys):
    with pytest.raises(ValueError, match="pretrain_epochs must be 0 or a positive integer, got -1"):
        train.TrainConfig(pretrain_epochs=-1)
    assert cli.main(["train", "--pretrain-epochs", "-2"]) == 2
    assert "pretrain_epochs must be 0 or a positive integer, got -2" in capsys.readouterr().err
