"""Embedding throughput on the real files (breast, retina, pneumonia: 8,236 images).

(a) the model's forward pass alone, batched, on images already decoded in memory, with
    torch eager and with ONNX Runtime (medsim.model.runtime), alternated in one run;
(b) the embedding worker end to end: claim (SKIP LOCKED) -> decode -> forward -> binary
    COPY -> dequeue -> commit, from process start to drained queue, once per runtime
    (two registered copies of the same network, so each has its own queue);
(c) the published notebook's way: batch-size-1 inference and one f-string INSERT of a
    FLOAT[] per row (reproduced here only to measure it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from common import PRESENT, SHARED, fresh_database, machine  # noqa: E402

from medsim import db, registry  # noqa: E402
from medsim.model import network, runtime  # noqa: E402
from medsim.model.config import preset  # noqa: E402
from medsim.sources import ingest  # noqa: E402
from medsim.training import data  # noqa: E402
from medsim.worker import Worker, WorkerConfig  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--preset", default="default")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=256, help="images the worker claims per transaction")
    p.add_argument("--data-dir", default=str(SHARED))
    p.add_argument("--skip-notebook", action="store_true")
    a = p.parse_args()
    url, server = fresh_database()
    dev = a.device
    print(f"machine: {machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, device {dev}"
          + (f" ({torch.cuda.get_device_name()})" if dev == "cuda" else ""))
    with db.connect(url, autocommit=True) as conn:
        for flag in PRESENT:
            ingest.ingest(conn, flag, data_dir=a.data_dir, accept_unofficial=True, allow_download=False,
                          show_progress=False)
        torch.manual_seed(0)
        net = network.EmbeddingNet(preset(a.preset)).eval()
        mid = registry.register(conn, net, mode="label", datasets=PRESENT, train_config={"bench": True})
        registry.set_current(conn, mid)
        images = data.load_split(conn, ["train", "val", "test"], PRESENT, input_size=net.cfg.image_size).images
        n = len(images)
        mid2 = registry.register(conn, net, mode="label", datasets=PRESENT, train_config={"bench": "copy"})
        net = net.to(dev)
        threads = torch.get_num_threads()
        rts = {"torch": runtime.TorchRuntime(net, dev)}
        if dev == "cpu":
            t0 = time.perf_counter()
            rts["onnx"] = runtime.prepare(net, "onnx", threads=threads)
            print(f"    ONNX export and parity check: {time.perf_counter() - t0:.2f} s, runtime {rts['onnx'].name}")
        fa = {}
        for rt in rts.values():
            rt.embed(images[:512])  # warm-up
        rounds = 5
        for _ in range(rounds):  # alternated, so a noisy neighbour on the machine hits both alike
            for name, rt in rts.items():
                if dev == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                rt.embed(images)
                fa.setdefault(name, []).append(n / (time.perf_counter() - t0))
        for name, v in fa.items():
            print(f"(a) forward alone, {name}, batch {rts[name].batch}, TTA {net.cfg.tta_flip}: {n} images, "
                  f"median of {rounds} {statistics.median(v):,.0f} images/s (all: {', '.join(f'{x:,.0f}' for x in v)})")
        if "onnx" in fa:
            ratios = [o / t for o, t in zip(fa["onnx"], fa["torch"], strict=True)]
            print(f"RATIO forward onnx/torch, median of the {rounds} paired rounds = {statistics.median(ratios):.2f}x "
                  f"(goal >= 2x; rounds: {', '.join(f'{r:.2f}' for r in ratios)})")
        fbs = {}
        copies = [mid, mid2] + [registry.register(conn, net, mode="label", datasets=PRESENT,
                                                  train_config={"bench": f"copy {i}"}) for i in range(2 * len(rts) - 2)]
        for i, model in enumerate(copies[:2 * len(rts)]):  # each runtime twice, alternated
            name = list(rts)[i % len(rts)]
            s = Worker(WorkerConfig(model=str(model), once=True, batch_size=a.batch_size, build_index=False,
                                    device=dev, database_url=url, progress=False, runtime=name)).run()
            fbs.setdefault(name, []).append(s.embedded / s.seconds)
            print(f"(b) worker end to end, {name} (connect, load model, claim, decode, forward, COPY, commit): "
                  f"{s.line()}")
            print(f"    where (b)'s time went: {s.breakdown()}")
        if "onnx" in fbs:
            print(f"RATIO worker onnx/torch = {max(fbs['onnx']) / max(fbs['torch']):.2f}x, best of 2 each "
                  f"(goal >= 1.5x)")
        fa, fb = statistics.median(fa["torch"]), max(fbs["torch"])
        if not a.skip_notebook:
            conn.execute("CREATE TABLE notebook_embeddings (image_id bigint, embedding float8[])")
            ids = [r[0] for r in conn.execute("SELECT id FROM medsim.images ORDER BY id")]
            conn.autocommit = False
            t0 = time.perf_counter()
            with torch.inference_mode():
                for image_id, x in zip(ids, images, strict=True):
                    v = net(network.to_input(x[None]).to(dev))[0].cpu().tolist()
                    conn.execute(f"INSERT INTO notebook_embeddings VALUES ({image_id}, ARRAY{v})")
            conn.commit()
            fc = n / (time.perf_counter() - t0)
            print(f"(c) notebook way (batch 1, one f-string INSERT per row): {n} images, {fc:,.0f} images/s")
            # where (c)'s time goes: batch-1 inference alone, and the INSERTs alone
            t0 = time.perf_counter()
            with torch.inference_mode():
                for x in images:
                    net(network.to_input(x[None]).to(dev))[0].cpu()
            f1 = n / (time.perf_counter() - t0)
            v = [0.0] * net.cfg.embedding_dim
            t0 = time.perf_counter()
            for image_id in ids:
                conn.execute(f"INSERT INTO notebook_embeddings VALUES ({image_id}, ARRAY{v})")
            conn.commit()
            fi = n / (time.perf_counter() - t0)
            print(f"    of which: batch-1 inference alone {f1:,.0f} images/s; row-by-row INSERTs alone {fi:,.0f} rows/s")
            print(f"RATIOS: (b)/(c) = {fb / fc:.1f}x (goal >= 50x), (b)/(a) = {fb / fa:.0%} (goal >= 50%)")
        else:
            print(f"RATIOS: (b)/(a) = {fb / fa:.0%} (goal >= 50%)")
    server.cleanup()


if __name__ == "__main__":
    main()
