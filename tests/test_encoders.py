"""Issue 36: bring your own encoder. `medsim models import FILE.onnx` checks and registers a
frozen ONNX encoder; workers embed with it through ONNX Runtime; search, evaluation,
explanations and `models compare` work on it; `medsim train --on` trains a contrastive
head on its features; and every file medsim cannot use is refused in one sentence."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from medsim import cli, registry
from medsim.errors import BadArgument, DataRefused
from medsim.model import explain, imported, network, runtime
from medsim.search import pgvector_hnsw
from tests.helpers import embed_all, ingest_synth, search


def export(module: torch.nn.Module, path, size: int, channels: int = 3, batch=None) -> str:
    module.eval()
    dyn = {} if batch else {"x": {0: "n"}, "z": {0: "n"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(batch or 2, channels, size, size),), str(path), dynamo=False,
                          input_names=["x"], output_names=["z"], dynamic_axes=dyn, opset_version=17)
    return str(path)


def resnet(dim: int | None = None) -> torch.nn.Module:
    """torchvision's ResNet-18, random weights (none can be downloaded), pooled features."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    net.fc = torch.nn.Identity() if dim is None else torch.nn.Linear(512, dim)
    return net


class Shape(torch.nn.Module):
    """A model whose output is whatever `out` makes of the input."""

    def __init__(self, out):
        super().__init__()
        self.conv, self.out = torch.nn.Conv2d(3, 4, 3), out

    def forward(self, x):
        return self.out(self.conv(x))


def test_a_torchvision_resnet_is_imported_embedded_searched_evaluated_and_explained(conn, db_url, synth_dir,
                                                                                     tmp_path, capsys):
    ingest_synth(conn, synth_dir)
    path = export(resnet(), tmp_path / "resnet18.onnx", 32)
    assert cli.main(["models", "import", path, "--name", "rn18"]) == 0
    said = capsys.readouterr().out
    assert "32 x 32 px, 3 channel(s)" in said and "512-d output (vector HNSW index)" in said
    row = registry.get(conn, "current")  # the first model on file becomes current
    assert (row.name, row.mode, row.embedding_dim, row.config["arch"]) == ("rn18", "imported", 512, "onnx")
    embed_all(db_url)
    n = conn.execute("SELECT count(*) FROM medsim.embeddings WHERE model_id = %s", (row.id,)).fetchone()[0]
    assert n == conn.execute("SELECT count(*) FROM medsim.images").fetchone()[0] > 0
    # the worker's vectors are the runtime's own, L2-normalised
    img_id, vec = conn.execute("SELECT image_id, embedding::text FROM medsim.embeddings WHERE model_id = %s "
                               "ORDER BY image_id LIMIT 1", (row.id,)).fetchone()
    assert abs(np.linalg.norm(np.array(vec.strip("[]").split(","), float)) - 1) < 1e-4
    (_, hits), = search(conn, [img_id], k=5)
    assert len(hits) == 5 and img_id not in [h.image_id for h in hits]
    assert cli.main(["evaluate", "--model", str(row.id), "--out-dir", str(tmp_path)]) == 0
    assert "map@5" in capsys.readouterr().out.lower()
    net = row.load(conn)  # a torch module over ONNX Runtime: explanations by occlusion, no gradients
    x = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), np.uint8)
    assert explain.method_for(net, "integrated_gradients") == "occlusion"
    ma, mb = explain.pair_maps(net, x[0], x[1])
    assert ma.shape == (32, 32) and np.abs(ma).sum() > 0
    assert cli.main(["models", "compare", str(row.id), "--no-timing"]) == 0
    # recall: FAISS built from the SQL view, checked against pgvector's exact search
    assert cli.main(["recall", "--model", str(row.id), "--all-kinds", "-k", "1,5", "--out-dir", str(tmp_path / "recall")]) == 0
    import json

    report = json.loads(next((tmp_path / "recall").glob("recall-model*-report*.json")).read_text())
    flat = [r for r in report["rows"] if r["engine"] == "faiss" and r["kind"] == "flat"]
    assert report["model_id"] == row.id and flat and flat[0]["recall"]["5"] >= 0.99


def test_medsims_own_network_exported_and_imported_finds_the_same_neighbours(conn, db_url, synth_dir, tmp_path):
    from tests.helpers import register_model

    ingest_synth(conn, synth_dir)
    own = register_model(conn)
    net = registry.get(conn, own).load(conn)
    path = tmp_path / "own.onnx"
    path.write_bytes(runtime.export(net))
    # medsim's input is x / 127.5 - 1: mean 0.5, std 0.5 on [0, 1] pixels
    assert cli.main(["models", "import", str(path), "--name", "own", "--mean", "0.5", "--std", "0.5"]) == 0
    twin = registry.candidates(conn)[-1]
    embed_all(db_url)
    ids = [r[0] for r in conn.execute("SELECT id FROM medsim.images ORDER BY id LIMIT 6")]
    for i in ids:
        (_, a), = search(conn, [i], k=9, model=own)
        (_, b), = search(conn, [i], k=9, model=twin)
        assert [h.image_id for h in a] == [h.image_id for h in b]
        assert np.allclose([h.distance for h in a], [h.distance for h in b], atol=1e-4)


def test_train_on_an_imported_encoder_trains_a_head(conn, db_url, synth_dir, tmp_path, capsys):
    ingest_synth(conn, synth_dir)
    assert cli.main(["models", "import", export(resnet(), tmp_path / "r.onnx", 32), "--name", "rn"]) == 0
    enc = registry.get(conn, "current").id
    assert cli.main(["train", "--on", str(enc), "--epochs", "3", "--steps-per-epoch", "5"]) == 0
    assert "contrastive head on model" in capsys.readouterr().out
    head = registry.get(conn, registry.candidates(conn)[-1])
    assert (head.embedding_dim, head.config["preset"], head.mode) == (64, "onnx+head", "label")
    rt = head.load(conn).rt
    z = rt.embed(np.random.default_rng(1).integers(0, 255, (3, 32, 32), np.uint8))
    assert z.shape == (3, 64) and np.allclose(np.linalg.norm(z, axis=1), 1, atol=1e-5)
    embed_all(db_url)
    (_, hits), = search(conn, [1], k=3, model=head.id)
    assert len(hits) == 3
    with pytest.raises(BadArgument, match="already has a head"):
        from medsim.training import encoders, train

        encoders.train_head(conn, head.id, train.TrainConfig(epochs=1), log=lambda *a: None)


def test_a_wide_encoder_is_indexed_on_halfvec(conn, db_url, synth_dir, tmp_path):
    ingest_synth(conn, synth_dir, flags=("breastmnist",))
    path = export(Shape(lambda h: h.flatten(1)[:, :2100] * 1.0), tmp_path / "wide.onnx", 32)
    assert cli.main(["models", "import", path, "--name", "wide"]) == 0
    mid = registry.get(conn, "current").id
    embed_all(db_url)
    assert pgvector_hnsw.exists(conn, mid)
    ddl = conn.execute("SELECT indexdef FROM pg_indexes WHERE indexname = %s",
                       (pgvector_hnsw.index_name(mid),)).fetchone()[0]
    assert "halfvec(2100)" in ddl and "halfvec_l2_ops" in ddl
    (_, hits), = search(conn, [1], k=4)
    assert len(hits) == 4


@pytest.mark.parametrize("make, args, refusal", [
    (lambda p: export(Shape(lambda h: h.flatten(2)), p, 32), [], r"has shape \(4, 4, 900\).*one vector per image"),
    (lambda p: export(Shape(lambda h: h.mean((2, 3)) * float("nan")), p, 32), [], "NaN or infinite"),
    (lambda p: export(Shape(lambda h: h.flatten(1)[:, :3000].repeat(1, 2)), p, 32), [],
     r"6000 dimensions; pgvector indexes at most 2000 \(vector\) or 4000 \(halfvec\)"),
    (lambda p: export(Shape(lambda h: h.mean((2, 3)) * 0 + 1), p, 32), [], "same vector for different images"),
    (lambda p: export(resnet(8), p, 32), ["--input-size", "64"], "takes 32 x 32 pixels, not --input-size 64"),
    (lambda p: export(resnet(8), p, 32), ["--channels", "1"], r"takes 3 channel\(s\), not --channels 1"),
    (lambda p: export(resnet(8), p, 32), ["--mean", "0.1,0.2"], "takes 1 or 3 numbers"),
    (lambda p: export(resnet(8), p, 32), ["--std", "0"], "above 0"),
    (lambda p: p.write_bytes(os.urandom(2048)) and str(p), [], "not an ONNX model ONNX Runtime can open"),
    (lambda p: p.write_bytes(b"") or str(p), [], "is empty"),
    # probes that broke it: a loop of links was "no such file"; external data gave ONNX Runtime's paragraph;
    # a mean past float32 a warning and "NaN on a probe batch"; one number per image was stored as an embedding
    (lambda p: os.symlink(p, p) or str(p), [], "a symbolic link to nothing"),
    (lambda p: _external(p), [], r"weights in another file \(ONNX external data\)"),
    (lambda p: export(resnet(8), p, 32), ["--mean", "1e300"], "within float32's range"),
    (lambda p: export(Shape(lambda h: h.mean((1, 2, 3))), p, 32), [], "one number per image"),
    (lambda p: export(resnet(8), p, 32), ["--name", ""], "--name must be 1-100 printable characters"),
    (lambda p: export(resnet(8), p, 32), ["--name", "a\nb"], "--name must be 1-100 printable characters"),
    (lambda p: export(resnet(8), p, 32), ["--name", "a" * 10_000], "--name must be 1-100 printable characters"),
])
def test_a_file_medsim_cannot_use_is_refused_in_a_sentence(conn, tmp_path, capsys, make, args, refusal):
    path = make(tmp_path / "m.onnx")
    assert cli.main(["models", "import", str(path), "--name", "x", *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert re.search(refusal, err), err
    assert conn.execute("SELECT count(*) FROM medsim.models").fetchone()[0] == 0  # nothing stored


def _external(path) -> str:
    """A model saved with its weights beside it (torch.onnx.export does so past 2 GB)."""
    import onnx

    full = export(resnet(8), path.with_suffix(".full"), 32)
    onnx.save_model(onnx.load(full), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.data", size_threshold=0)
    return str(path)


class _NaNWhenDark(torch.nn.Module):
    """Finite on the probe batch (pixel means near 128), NaN for images darker than `below`
    (on [0, 1] pixels, given --mean 0 --std 1)."""

    def __init__(self, below: float):
        super().__init__()
        self.conv, self.below = torch.nn.Conv2d(3, 8, 3), below

    def forward(self, x):
        return self.conv(x).mean((2, 3)) + torch.sqrt(x.mean((1, 2, 3))[:, None] - self.below) * 0


def test_train_on_leaves_out_images_the_encoder_gives_nan_for(conn, synth_dir, tmp_path, capsys):
    """Three train images of eleven gave NaN features: every loss was NaN, and the head stored
    with NaN weights (every embedding NaN). Now they are left out, said, and the head is finite."""
    ingest_synth(conn, synth_dir, flags=("breastmnist",))
    path = export(_NaNWhenDark(50.5 / 255), tmp_path / "dark.onnx", 32)
    assert cli.main(["models", "import", path, "--name", "dark", "--mean", "0", "--std", "1"]) == 0
    enc = registry.get(conn, "current").id
    assert cli.main(["train", "--on", str(enc), "--epochs", "2", "--steps-per-epoch", "3"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\d+ train image\(s\) left out: model \d+ gives NaN", out), out
    head = registry.get(conn, registry.candidates(conn)[-1]).load(conn).rt.head
    assert all(np.isfinite(v).all() for v in head.values())
    # an encoder that gives NaN for every image: refused in a sentence, nothing stored
    path = export(_NaNWhenDark(0.3), tmp_path / "all.onnx", 32)
    assert cli.main(["models", "import", path, "--name", "all", "--mean", "0", "--std", "1"]) == 0
    n = conn.execute("SELECT count(*) FROM medsim.models").fetchone()[0]
    assert cli.main(["train", "--on", str(registry.candidates(conn)[-1]), "--epochs", "1"]) == 2
    assert "gives NaN or infinite values for every train image" in capsys.readouterr().err
    assert conn.execute("SELECT count(*) FROM medsim.models").fetchone()[0] == n


def test_fixed_batch_sizes_symbolic_inputs_fifos_and_size_limits(conn, tmp_path, monkeypatch):
    # a file exported with batch 1 fixed: run image by image (the last chunk padded)
    one = export(resnet(16), tmp_path / "b1.onnx", 32, batch=1)
    blob = Path(one).read_bytes()
    rt = imported.ImportedRuntime(blob, imported.inspect(blob))
    x = np.random.default_rng(0).integers(0, 255, (5, 32, 32, 3), np.uint8)
    assert rt.embed(x).shape == (5, 16)
    # height and width symbolic: the size must be said
    net = resnet(8).eval()
    sym = tmp_path / "sym.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(2, 3, 32, 32),), str(sym), dynamo=False, input_names=["x"],
                          output_names=["z"], dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}}, opset_version=17)
    with pytest.raises(BadArgument, match="not fixed in the file: give --input-size N"):
        imported.inspect(sym.read_bytes())
    assert imported.inspect(sym.read_bytes(), input_size=48).image_size == 48
    fifo = tmp_path / "fifo.onnx"
    os.mkfifo(fifo)
    with pytest.raises(BadArgument, match="not a regular file"):
        imported.read_file(fifo)  # never opened: a FIFO would block the read
    monkeypatch.setattr(imported, "MAX_BYTES", 1000)
    with pytest.raises(DataRefused, match="at most 1 GB"):
        imported.read_file(one)
    grey = export(_Grey(), tmp_path / "grey.onnx", 32, channels=1)
    cfg = imported.inspect(Path(grey).read_bytes())
    assert (cfg.channels, cfg.mean, cfg.std) == (1, (0.485,), (0.229,))


class _Grey(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3)

    def forward(self, x):
        return self.conv(x).mean((2, 3))


def test_an_imported_model_embeds_a_search_by_file_without_torch(conn, db_url, synth_dir, tmp_path):
    """for_query(): the stored ONNX bytes, no torch network built."""
    ingest_synth(conn, synth_dir, flags=("breastmnist",))
    assert cli.main(["models", "import", export(resnet(), tmp_path / "r.onnx", 32), "--name", "rn"]) == 0
    row = registry.get(conn, "current")
    from medsim.model.config import ModelConfig

    def no_torch():
        raise AssertionError("the torch network was built")

    rt = runtime.for_query(ModelConfig.from_dict(row.config), row.checkpoint_sha256(conn), no_torch,
                           load_checkpoint=lambda: row.checkpoint(conn).checkpoint)
    assert isinstance(rt, imported.ImportedRuntime)
    assert network.ImportedNet(rt)(torch.zeros(1, 3, 32, 32)).shape == (1, 512)


def test_imports_at_once_on_an_empty_registry_leave_one_current_and_the_rest_candidates(conn, db_url, tmp_path):
    """Run N copies at once: each saw "no current model" and made itself current, the
    first left neither current nor a candidate (never embedded). The registry lock."""
    import subprocess
    import sys

    path = export(resnet(8), tmp_path / "r.onnx", 32)
    env = {**os.environ, "DATABASE_URL": db_url}
    procs = [subprocess.Popen([sys.executable, "-m", "medsim", "models", "import", path, "--name", f"m{i}"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    rows = conn.execute("SELECT is_current, candidate FROM medsim.models ORDER BY id").fetchall()
    assert sorted(rows) == [(False, True), (False, True), (True, False)]


def test_a_search_by_file_whose_embedding_is_nan_is_refused_in_a_sentence(conn, synth_dir, tmp_path, capsys):
    """`medsim search --image-file black.png` on such a model: psycopg's 'NaN not allowed in
    vector' traceback; now one sentence, exit 2."""
    from PIL import Image

    ingest_synth(conn, synth_dir, flags=("breastmnist",))
    path = export(_NaNWhenDark(50.5 / 255), tmp_path / "dark.onnx", 32)
    assert cli.main(["models", "import", path, "--name", "dark", "--mean", "0", "--std", "1"]) == 0
    black = tmp_path / "black.png"
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(black)
    assert cli.main(["search", "--image-file", str(black), "-k", "3"]) == 2
    err = capsys.readouterr().err
    assert "gives NaN or infinite values for this image" in err and len(err.strip().splitlines()) == 1, err
