"""The input size is the archive's (issue 36): `medsim train --image-size`, the size rule,
the ResNet preset above 28 px, and every door embedding at the model's recorded size."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from medsim import cli, registry
from medsim.errors import BadArgument
from medsim.model import network, runtime
from medsim.model.config import preset
from medsim.service.app import create_app
from medsim.service.state import ServeConfig
from medsim.sources import archive
from medsim.sources.folder import FolderSource
from medsim.training import sizing, train
from tests.helpers import embed_all, image_by_path, ingest_synth, search


def ids(hits) -> list[int]:
    return [h.image_id for h in hits]


def make_archive(root, size=64, per_label=14):
    """Two labels a network can tell apart at 64 px but hardly at 28: a small bright square
    in one corner or the other, on noise."""
    rng = np.random.default_rng(5)
    for k, label in enumerate(("left", "right")):
        (root / label).mkdir(parents=True)
        for i in range(per_label):
            x = rng.integers(0, 90, (size, size), dtype=np.uint8)
            o = 6 + i % 5
            if k == 0:
                x[o : o + 8, o : o + 8] = 240
            else:
                x[-o - 8 : -o, -o - 8 : -o] = 240
            Image.fromarray(x).save(root / label / f"{i}.png")
    return root


# ---------------------------------------------------------------- the rules
def test_the_default_size_is_the_archive_s_within_the_budget():
    rule = sizing.archive_size
    assert rule(None) == rule(28) == rule(20) == 28  # MedMNIST 28 px: the native network, unchanged
    assert (rule(64), rule(100), rule(256), rule(512)) == (64, 96, 128, 128)
    assert rule(256, "cuda") == 224 and rule(40) == 32
    none = sizing.Sides(None, None, 0)
    assert sizing.resolve(None, None, sizing.Sides(28, 28, 10)) == ("default", 28, None)
    assert sizing.resolve(None, None, sizing.Sides(256, 300, 10))[:2] == ("resnet", 128)
    assert sizing.resolve("default", None, sizing.Sides(256, 300, 10))[:2] == ("default", 28)  # as it was
    assert sizing.resolve("resnet", None, sizing.Sides(64, 64, 10))[:2] == ("resnet", 64)
    assert sizing.resolve(None, 28, none)[:2] == ("default", 28)
    name, size, warning = sizing.resolve(None, 96, sizing.Sides(64, 64, 10))
    assert (name, size) == ("resnet", 96) and "upscaled" in warning


def test_medmnist_at_28_px_keeps_the_28_px_network(conn, synth_dir):
    ingest_synth(conn, synth_dir)
    sides = sizing.stored_sides(conn, None, 28)
    assert sizing.resolve(None, None, sides)[:2] == ("default", 28)


@pytest.mark.parametrize("size", ["8", "15", "513", "2048"])
def test_sizes_out_of_range_are_refused_in_one_sentence(db_url, size, capsys):
    assert cli.main(["train", "--image-size", size]) == 2
    err = capsys.readouterr().err.strip()
    assert "from 16 to 512 px" in err and size in err and "\n" not in err and "Traceback" not in err
    with pytest.raises(BadArgument):
        train.TrainConfig(input_size=int(size))


# ---------------------------------------------------------------- the network
def test_the_resnet_rebuilds_from_its_checkpoint_and_exports_with_parity():
    net = network.EmbeddingNet(preset("resnet", image_size=64)).eval()
    x = runtime.probe_images(64, 8)
    data, sha = network.save_checkpoint(net)
    again = network.load_checkpoint(data, sha)  # the stored config alone rebuilds it
    assert again.cfg.arch == "resnet18" and again.cfg.image_size == 64
    z = network.embed(again, x)
    assert z.shape == (8, 64) and np.allclose(np.linalg.norm(z, axis=1), 1, atol=1e-5)
    assert np.allclose(z, network.embed(net, x), atol=1e-5)
    # flip TTA: a mirrored image embeds as the image itself
    assert np.allclose(network.embed(net, x[:, :, ::-1]), z, atol=1e-4)
    rt = runtime.prepare(again, runtime="onnx")
    assert isinstance(rt, runtime.OnnxRuntime)  # parity held: ONNX Runtime embeds it
    assert runtime.max_cosine_gap(rt.embed(x), z) < runtime.PARITY_COSINE


# ---------------------------------------------------------------- every door at 64 px
def test_a_model_trained_at_64_px_is_searched_alike_by_id_file_upload_region_and_explained(
        conn, tmp_path, db_url, capsys):
    root = make_archive(tmp_path / "corners")
    archive.ingest_archive(conn, FolderSource(root), "corners", progress=False)
    assert sizing.resolve(None, None, sizing.stored_sides(conn, ["corners"], 28))[:2] == ("resnet", 64)
    assert cli.main(["train", "--image-size", "64", "--epochs", "1", "--steps-per-epoch", "2", "--per-class", "4",
                     "--datasets", "corners", "--out-dir", str(tmp_path / "out"), "--quiet"]) == 0
    capsys.readouterr()  # training's own lines
    model = registry.get(conn, "current")
    assert model.config["image_size"] == 64 and model.config["preset"] == "resnet"
    assert conn.execute("SELECT train_config ->> 'input_size' FROM medsim.models WHERE id = %s",
                        (model.id,)).fetchone()[0] == "64"
    embed_all(db_url)
    files = sorted(root.rglob("*.png"))[::5]
    with TestClient(create_app(ServeConfig(auth=False, database_url=db_url))) as client:
        for f in files:
            gid = image_by_path(conn, str(f.relative_to(root)))[0]
            stored = conn.execute("SELECT embedding FROM medsim.embeddings WHERE image_id = %s AND model_id = %s",
                                  (gid, model.id)).fetchone()[0].to_numpy()
            # the neighbours of the stored embedding, exactly, from the table
            exact = [r[0] for r in conn.execute(
                "SELECT image_id FROM medsim.embeddings WHERE model_id = %s AND image_id <> %s "
                "ORDER BY embedding <-> %s::vector, image_id LIMIT 4", (model.id, gid, str([float(v) for v in stored]))).fetchall()]
            [(qi, by_id), (qf, by_file), (qr, by_region)] = [
                *search(conn, image_ids=[gid], image_files=[f], k=4), *search(conn, image_ids=[gid], k=4,
                                                                                box=(0, 0, 64, 64))]
            for q in (qi, qf, qr):  # the whole image as a region is the image
                assert np.allclose(q.vector, stored, atol=1e-4), f
            assert ids(by_id) == ids(by_file) == exact, f
            assert ids(by_region) == exact, f
            assert cli.main(["search", "--image-file", str(f), "-k", "4", "--json"]) == 0
            [doc] = json.loads(capsys.readouterr().out)
            assert [n["image_id"] for n in doc["neighbours"]] == exact, f
            r = client.post("/search/upload", files={"image": (f.name, f.read_bytes(), "image/png")}, data={"k": "4"})
            assert r.status_code == 200, r.text
            assert [n["image_id"] for n in r.json()["neighbours"]] == exact, f
        r = client.get("/explain", params={"query": str(gid), "neighbour": exact[0], "format": "json"})
        assert r.status_code == 200, r.text
