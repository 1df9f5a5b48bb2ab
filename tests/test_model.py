import dataclasses

import numpy as np
import pytest
import torch

from medsim import registry
from medsim.model import network
from medsim.model.config import preset
from medsim.training import data, evaluate, metrics, train
from medsim.training.pairs import sample_pairs


# ------------------------------------------------------------------ loss
def test_contrastive_loss_cases():
    m = 1.0
    d = torch.tensor([0.0, 0.3, 1.0, 1.5, 0.2])
    same = torch.tensor([1, 1, 0, 0, 0])
    per = [network.contrastive_loss(d[i : i + 1], same[i : i + 1], m).item() for i in range(5)]
    assert per[0] == 0.0  # identical similar pair
    assert per[1] == pytest.approx(0.3**2 / 2)  # similar pair apart: positive
    assert per[2] == 0.0 and per[3] == 0.0  # dissimilar pair beyond the margin
    assert per[4] == pytest.approx((1 - 0.2) ** 2 / 2)  # dissimilar pair too close
    d0 = torch.zeros(3, requires_grad=True)
    network.contrastive_loss(torch.sqrt(d0 + 1e-12), torch.tensor([0, 0, 0]), m).backward()
    assert torch.isfinite(d0.grad).all()


def test_batch_contrastive_loss_margins_and_mining():
    """Every pair of a batch: positives pulled in, same-subset negatives pushed to the margin,
    other-subset negatives to the larger dataset margin; satisfied pairs contribute nothing."""
    def loss(z, key, ds, **kw):
        return network.batch_contrastive_loss(torch.tensor(z, dtype=torch.float32), torch.tensor(key),
                                              torch.tensor(ds), margin=1.0, dataset_margin=1.4, **kw).item()

    # two positives on top of each other, a same-subset negative 1.1 away, another subset 1.5 away
    z = [[0.0, 0.0], [0.0, 0.0], [1.1, 0.0], [0.0, 1.5]]
    assert loss(z, [0, 0, 1, 2], [0, 0, 0, 1]) == pytest.approx(0, abs=1e-6)
    # the other subset at 1.2: inside the dataset margin (1.4) though outside the label margin
    z2 = [[0.0, 0.0], [0.0, 0.0], [1.1, 0.0], [0.0, 1.2]]
    got = loss(z2, [0, 0, 1, 2], [0, 0, 0, 1])
    # only the pairs (0,3), (1,3) violate: each (1.4 - 1.2)^2; the mean is over the violators;
    # no positive term (the positives coincide): (0 + 0.04) / 2
    assert got == pytest.approx((1.4 - 1.2) ** 2 / 2, rel=1e-4)
    # the same geometry inside one subset is fine: 1.2 > the label margin
    assert loss(z2, [0, 0, 1, 2], [0, 0, 0, 0]) == pytest.approx(0, abs=1e-6)
    # positives apart are pulled in unless within pos_margin
    z3 = [[0.0, 0.0], [0.3, 0.0], [0.0, 2.0]]
    assert loss(z3, [0, 0, 1], [0, 0, 0]) == pytest.approx(0.3**2 / 2, rel=1e-4)
    assert loss(z3, [0, 0, 1], [0, 0, 0], pos_margin=0.5) == pytest.approx(0, abs=1e-6)
    # ordinal grades: adjacent grades need only half the margin, grades two apart the whole
    z4 = [[0.0, 0.0], [0.6, 0.0]]
    assert loss(z4, [0, 1], [0, 0], grade=torch.tensor([1, 2])) == pytest.approx(0, abs=1e-6)
    assert loss(z4, [0, 1], [0, 0], grade=torch.tensor([1, 3])) == pytest.approx(0.4**2 / 2, rel=1e-4)
    # finite gradients even for coincident points
    zz = torch.zeros(4, 8, requires_grad=True)
    network.batch_contrastive_loss(zz, torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 0, 1]), 1.0, 1.4).backward()
    assert torch.isfinite(zz.grad).all()


def test_pk_batches_hold_every_diagnosis():
    keys = np.repeat([0, 1, 2], [100, 5, 40])  # one diagnosis has fewer images than per_class
    rng = np.random.default_rng(0)
    batches = list(train.pk_batches(keys, per_class=8, steps=3, rng=rng))
    assert len(batches) == 3
    for b in batches:
        assert len(b) == 24 and (np.bincount(keys[b], minlength=3) == 8).all()
        assert len(set(b[keys[b] == 0])) == 8  # without replacement where there are enough


def test_augment_is_seeded_bounded_and_label_preserving_at_zero_strength():
    from medsim.training import augment

    x = torch.rand(6, 3, 28, 28) * 2 - 1
    a1 = augment.augment(x, "affine", torch.Generator().manual_seed(3))
    a2 = augment.augment(x, "affine", torch.Generator().manual_seed(3))
    assert a1.shape == x.shape and torch.equal(a1, a2) and a1.abs().max() <= 1
    assert not torch.allclose(a1, x)
    assert torch.equal(augment.augment(x, "none", torch.Generator()), x)
    # with every range at zero the affine path is the identity or the mirror image, per image
    a0 = augment.augment(x, "affine", torch.Generator().manual_seed(1), degrees=0, scale=0, shift_px=0, jitter=0)
    for i in range(len(x)):
        assert torch.allclose(a0[i], x[i], atol=1e-5) or torch.allclose(a0[i], x[i].flip(-1), atol=1e-5)
    with pytest.raises(ValueError, match="augment must be one of"):
        augment.augment(x, "mixup", torch.Generator())


def test_members_and_flip_tta_survive_a_checkpoint():
    torch.manual_seed(0)
    net = network.EmbeddingNet(preset("default", members=2, tta_flip=True)).eval()
    x = torch.rand(5, 3, 28, 28) * 2 - 1
    with torch.no_grad():
        z = net(x)
        assert z.shape == (5, 64) and torch.allclose(z.norm(dim=1), torch.ones(5), atol=1e-5)
        # flip TTA: an image and its mirror image get the same embedding
        assert torch.allclose(net(x.flip(-1)), z, atol=1e-5)
        parts = net.train().parts(x)  # (updates the BatchNorm statistics: z changes)
        assert len(parts) == 2 and all(p.shape == (5, 32) for p in parts)
        z = net.eval()(x)
    blob, sha = network.save_checkpoint(net)
    back = network.load_checkpoint(blob, sha)
    assert back.cfg.members == 2 and back.cfg.tta_flip
    with torch.no_grad():
        assert torch.allclose(back(x), z, atol=1e-6)
    with pytest.raises(ValueError, match="multiple of members"):
        network.EmbeddingNet(preset("default", members=3))


# ------------------------------------------------------------------ pairs
@pytest.mark.parametrize("mode", ["dataset", "label"])
def test_pairs_balanced_deterministic_and_correct(mode):
    rng = np.random.default_rng(0)
    ds = np.repeat([1, 2, 3], [50, 200, 20])
    keys = ds * 10 + rng.integers(0, 3, len(ds))
    a, b, same = sample_pairs(ds, keys, 1001, mode, seed=5)
    a2, b2, same2 = sample_pairs(ds, keys, 1001, mode, seed=5)
    a3, _, _ = sample_pairs(ds, keys, 1001, mode, seed=6)
    assert np.array_equal(a, a2) and np.array_equal(b, b2) and np.array_equal(same, same2)
    assert not np.array_equal(a, a3)
    assert same.sum() == 500 and len(same) == 1001
    pos, neg = same == 1, same == 0
    if mode == "dataset":
        assert (ds[a[pos]] == ds[b[pos]]).all() and (ds[a[neg]] != ds[b[neg]]).all()
    else:
        assert (keys[a[pos]] == keys[b[pos]]).all() and (keys[a[neg]] != keys[b[neg]]).all()
        hard = neg & (ds[a] == ds[b])
        assert 0.4 < hard.sum() / neg.sum() < 0.6  # half the negatives are same-subset
    assert (a != b).all()
    # anchors are spread over subsets, not proportional to their size
    share = np.bincount(ds[a])[1:] / len(a)
    assert share.min() > 0.25


def test_dataset_mode_needs_two_subsets():
    with pytest.raises(ValueError, match="two subsets"):
        sample_pairs(np.ones(10, int), np.arange(10) % 2, 10, "dataset", 0)


# ------------------------------------------------------------------ metrics
def test_roc_auc_hand_cases_with_ties():
    assert metrics.roc_auc([3, 2, 1, 0], [1, 1, 0, 0]) == 1.0
    assert metrics.roc_auc([0, 1, 2, 3], [1, 1, 0, 0]) == 0.0
    assert metrics.roc_auc([1, 1, 1, 1], [1, 0, 1, 0]) == 0.5  # all tied
    # pos {2, 1}, neg {1, 0}: pairs (2>1)=1, (2>0)=1, (1=1)=.5, (1>0)=1 -> 3.5/4
    assert metrics.roc_auc([2, 1, 1, 0], [1, 1, 0, 0]) == pytest.approx(0.875)


def test_best_threshold_and_accuracy():
    dist = np.array([0.1, 0.2, 0.8, 0.9, 0.5])
    same = np.array([1, 1, 0, 0, 1])
    t, acc = metrics.best_threshold(dist, same)
    assert acc == 1.0 and 0.5 <= t < 0.8
    assert metrics.pair_accuracy(dist, same, 0.15) == pytest.approx(0.6)
    # pairs at distance 0 are handled (the notebook's sigmoid rule was undefined there)
    t0, acc0 = metrics.best_threshold(np.zeros(4), np.array([1, 1, 0, 0]))
    assert acc0 == 0.5


def test_knn_search_breaks_ties_by_gallery_position():
    xb = np.array([[1, 0], [0, 1], [-1, 0], [0, -1], [2, 0]], np.float32)
    D, I = metrics.knn_search(np.zeros((1, 2), np.float32), xb, k=5)
    assert I[0].tolist() == [0, 1, 2, 3, 4]  # four at distance 1, in id order
    assert np.allclose(D[0], [1, 1, 1, 1, 2])


def test_average_precision_and_vote_hand_cases():
    # relevant at ranks 1 and 3 of 5; 10 relevant exist -> (1/1 + 2/3) / 5
    assert metrics.average_precision_at_k(np.array([1, 0, 1, 0, 0]), 5, 10) == pytest.approx((1 + 2 / 3) / 5)
    # only 2 relevant exist in the gallery: both found at ranks 1 and 2 -> perfect
    assert metrics.average_precision_at_k(np.array([1, 1, 0, 0, 0]), 5, 2) == 1.0
    assert metrics.knn_vote(np.array([7, 8, 8, 7])) == 7  # 2-2 tie -> nearest first
    assert metrics.knn_vote(np.array([7, 8, 8])) == 8


def test_retrieval_metrics_hand_case():
    b_ds = np.array([1, 1, 1, 2, 2])
    b_key = np.array([10, 10, 11, 20, 20])
    I = np.array([[0, 3, 2, 1, 4], [3, 4, 0, 1, 2]])
    r = metrics.retrieval_metrics(I, np.array([1, 2]), np.array([10, 20]), b_ds, b_key,
                                  k_modality=2, k_map=2, k_vote=3)
    assert r["modality_p@2"] == pytest.approx((0.5 + 1.0) / 2)
    # q0: rel [1,0] R=2 -> 1/2 ; q1: rel [1,1] R=2 -> 1
    assert r["label_map@2"] == pytest.approx(0.75)
    assert r["acc@1"] == 1.0
    assert r["knn3_acc"] == 1.0  # q0 votes 10,20,11: three-way tie -> 10, the nearest


# ------------------------------------------------------------------ checkpoints and training
def test_checkpoint_round_trip_identical_embeddings():
    torch.manual_seed(0)
    for name in ("default", "seed"):
        net = network.EmbeddingNet(preset(name)).eval()
        s = net.cfg.image_size
        x = np.random.default_rng(0).integers(0, 256, (5, s, s, 3), dtype=np.uint8)
        blob, sha = network.save_checkpoint(net)
        again = network.load_checkpoint(blob, expected_sha256=sha)
        assert again.cfg == net.cfg
        assert np.array_equal(network.embed(net, x), network.embed(again, x))
        with pytest.raises(ValueError, match="sha256"):
            network.load_checkpoint(blob, expected_sha256="0" * 64)


def test_to_input_grey_and_colour():
    grey = np.full((2, 28, 28), 255, np.uint8)
    x = network.to_input(grey)
    assert x.shape == (2, 3, 28, 28) and float(x.max()) == 1.0
    assert float(network.to_input(np.zeros((1, 28, 28, 3), np.uint8)).min()) == -1.0


@pytest.fixture
def ingested(conn, synth_dir):
    from medsim.sources import ingest

    for flag in ("breastmnist", "retinamnist"):
        ingest.ingest(conn, flag, data_dir=synth_dir, accept_unofficial=True, show_progress=False)
    return conn


@pytest.mark.parametrize("field, value, message", [
    ("epochs", 0, "epochs must be a positive integer, got 0"),
    ("batch_size", -4, "batch_size must be a positive integer"),
    ("lr", 0.0, "lr must be positive"),
    ("mode", "diagnosis", "mode must be 'label' or 'dataset'"),
    ("preset", "vit", "unknown preset 'vit'"),
    ("sampler", "triplets", "sampler must be one of"),
    ("per_class", 0, "per_class must be a positive integer"),
    ("augment", "mixup", "augment must be one of"),
    ("select_on", "test_map", "select_on must be one of"),
])
def test_train_config_refuses_bad_values(field, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        train.TrainConfig(**{field: value})


def test_few_training_steps_lower_the_loss(ingested):
    tr = data.load_split(ingested, ["train"])
    torch.manual_seed(0)
    net = network.EmbeddingNet(preset("default"))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    x = network.to_input(tr.images)
    a, b, same = sample_pairs(tr.dataset_ids, tr.label_keys, 256, "label", seed=0)
    y = torch.as_tensor(same)

    def loss():
        za, zb = net(torch.cat([x[a], x[b]])).chunk(2)
        return network.contrastive_loss(network.pair_distance(za, zb), y, 1.0)

    net.train()
    first = loss().item()
    for _ in range(15):
        opt.zero_grad()
        step = loss()
        step.backward()
        opt.step()
    with torch.no_grad():  # still batch statistics, as `first` was measured
        assert loss().item() < first * 0.8


def test_train_registers_model_history_and_curves(ingested, tmp_path):
    tcfg = train.TrainConfig(mode="label", epochs=2, steps_per_epoch=12, val_pairs=200)
    mid = train.train(ingested, tcfg, out_dir=tmp_path, progress=False, log=lambda *a: None)
    row = registry.get(ingested, "current")
    assert row.id == mid and row.mode == "label" and row.embedding_dim == 64
    assert sorted(row.datasets) == ["breastmnist", "retinamnist"]
    epochs = ingested.execute("SELECT epoch, train_loss, val_auc FROM medsim.training_epochs "
                              "WHERE model_id = %s ORDER BY epoch", (mid,)).fetchall()
    assert [e[0] for e in epochs] == [1, 2] and all(0 <= e[2] <= 1 for e in epochs)
    assert max(e[2] for e in epochs) > 0.8  # the synthetic labels are learnable: val pairs must show it
    assert (tmp_path / f"model-{mid}" / "loss.png").stat().st_size > 1000
    assert (tmp_path / f"model-{mid}" / "accuracy.png").exists()
    net = row.load(ingested)  # rebuilt from the database alone
    assert net.cfg.embedding_dim == 64 and net.cfg.tta_flip
    # the demo reuses a model only for the very same recipe (every field but the device)
    same = dataclasses.replace(tcfg, flags=["retinamnist", "breastmnist"], device="cpu")
    assert registry.reusable(ingested, same) == mid
    assert registry.reusable(ingested, dataclasses.replace(same, augment="flip")) is None
    assert registry.reusable(ingested, dataclasses.replace(same, dataset_margin=1.2)) is None
    # a model trained before a field existed: its recipe lacks the key, which then means
    # the field's default (the old behaviour), not "different"
    ingested.execute("UPDATE medsim.models SET train_config = train_config - 'pretrain_epochs' WHERE id = %s", (mid,))
    assert registry.reusable(ingested, same) == mid
    assert registry.reusable(ingested, dataclasses.replace(same, pretrain_epochs=5)) is None

    r = evaluate.evaluate(ingested, mid)
    assert set(r["retrieval"]) == {"breastmnist", "retinamnist"}
    for flag, m in r["retrieval"].items():
        assert 0 <= m["label_map@5"] <= 1 and m["n_queries"] > 0
        assert flag in r["baseline_raw_pixel_cosine"]
    assert 0.5 <= r["pairs"]["dataset"]["test_auc"] <= 1
    stored = ingested.execute("SELECT results FROM medsim.evaluations WHERE id = %s",
                              (r["evaluation_id"],)).fetchone()[0]
    assert stored["model_id"] == mid
    assert "pair verification" in evaluate.format_table(r)

    mid2 = train.train(ingested, train.TrainConfig(mode="dataset", epochs=1, sampler="pairs",
                                                   pairs_per_epoch=256, val_pairs=100), out_dir=tmp_path, progress=False,
                       set_current=False, log=lambda *a: None)
    assert registry.get(ingested).id == mid  # not switched
    registry.set_current(ingested, mid2)
    assert registry.get(ingested).id == mid2
    assert ingested.execute("SELECT count(*) FROM medsim.models WHERE is_current").fetchone()[0] == 1
    with pytest.raises(LookupError):
        registry.set_current(ingested, 9999)


def test_cli_gives_clear_errors_for_bad_train_and_status_arguments(conn, capsys):
    from medsim import cli

    assert cli.main(["train", "--epochs", "0"]) == 2
    assert "train: epochs must be a positive integer, got 0" in capsys.readouterr().err
    assert cli.main(["status", "--model", "99"]) == 2
    assert "no model with id 99" in capsys.readouterr().err
    assert conn.execute("SELECT count(*) FROM medsim.models").fetchone()[0] == 0


def test_literature_definitions_hand_cases():
    """The published protocol's metrics, on the examples its own metric.py documents."""
    # ap_k(['a'], ['a', 'a', 'n', 'a', 'j'], 5) = 0.92: hits at ranks 1, 2, 4 -> (1 + 1 + 3/4) / 3
    assert metrics.ap_at_k_hits(np.array([1, 1, 0, 1, 0]), 5) == pytest.approx(11 / 12)
    # one hit at rank 1 of 5: 1.0 here, 0.2 in medsim's stricter AP (divided by min(k, R))
    assert metrics.ap_at_k_hits(np.array([1, 0, 0, 0, 0]), 5) == 1.0
    assert metrics.average_precision_at_k(np.array([1, 0, 0, 0, 0]), 5, n_relevant=100) == 0.2
    assert metrics.ap_at_k_hits(np.array([0, 0, 0, 0, 0]), 5) == 0.0
    # mMV: label 3 among [1, 2, 5, 3, 1] is not the majority (1 is); ties count for every tied label
    assert metrics.majority_vote_hit([1, 2, 5, 3, 1], 3) == 0.0
    assert metrics.majority_vote_hit([3, 2, 3, 2, 1], 2) == 1.0 and metrics.majority_vote_hit([3, 2, 3, 2, 1], 3) == 1.0
    I = np.array([[0, 1, 2, 3, 4], [4, 3, 2, 1, 0]])
    b = np.array([7, 8, 8, 8, 7])
    r = metrics.literature_metrics(I, np.array([8, 7]), b)
    assert r["acc@1"] == 0.5 and r["acc@3"] == 1.0 and r["mmv@5"] == 0.5 and r["n_queries"] == 2
    assert r["map@5"] == pytest.approx((np.mean([1 / 2, 2 / 3, 3 / 4]) + np.mean([1, 2 / 5])) / 2)


def test_bootstrap_interval_is_seeded_and_narrows_with_more_queries():
    rng = np.random.default_rng(0)
    few, many = rng.random(50) < 0.7, rng.random(5000) < 0.7
    lo, hi = metrics.bootstrap_ci(few)
    assert lo < few.mean() < hi and metrics.bootstrap_ci(few) == [lo, hi]
    lo2, hi2 = metrics.bootstrap_ci(many)
    assert hi2 - lo2 < (hi - lo) / 5
