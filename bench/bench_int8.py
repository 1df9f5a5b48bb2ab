"""int8 quantisation of the exported network, measured against the issue's parity rule.

The worker and the service embed through ONNX Runtime in float32 (medsim.model.runtime).
This measures what ONNX Runtime's int8 quantisation would give on the database's current
model: static QDQ (per-channel int8 weights, activations calibrated on 1,024 seeded
train images), static QOperator, and dynamic (weights only). For each: forward images/s
on the train split (median of 3, batch 1024, the worker's threads), the largest
1 - cosine against torch's embeddings, and tie-aware recall@10 of test queries' neighbours
in the train split against torch's (a returned neighbour counts when its torch distance is
within torch's 10th). The issue's parity rule: 1 - cosine <= 1e-3 and recall@10 >= 0.99.

    MEDSIM_HOME=<a home whose database has a trained model> python bench/bench_int8.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rerank import current_model_splits  # noqa: E402

from medsim.model import network, runtime  # noqa: E402
from medsim.search.recall import tie_aware_recall  # noqa: E402
from medsim.training import metrics  # noqa: E402

N_CALIBRATION, BATCH, K = 1024, 1024, 10


def embed(sess, x: np.ndarray) -> np.ndarray:
    return np.concatenate([sess.run(None, {"x": x[i:i + BATCH]})[0] for i in range(0, len(x), BATCH)])


def variants(net, train_inputs: np.ndarray, work: Path) -> dict[str, Path]:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32, pre = work / "fp32.onnx", work / "pre.onnx"
    fp32.write_bytes(runtime.export(net))
    quant_pre_process(str(fp32), str(pre))  # shape inference the quantiser needs
    rows = np.random.default_rng(0).choice(len(train_inputs), min(N_CALIBRATION, len(train_inputs)), replace=False)
    cal = train_inputs[np.sort(rows)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"x": cal[i:i + 128]} for i in range(0, len(cal), 128)])

        def get_next(self):
            return next(self.batches, None)

    out = {"float32 (the default)": fp32}
    for name, fmt in (("int8 static, QDQ, per channel", QuantFormat.QDQ),
                      ("int8 static, QOperator, per channel", QuantFormat.QOperator)):
        path = work / f"{fmt.name}.onnx"
        quantize_static(str(pre), str(path), Reader(), quant_format=fmt, per_channel=True,
                        weight_type=QuantType.QInt8)
        out[name] = path
    quantize_dynamic(str(pre), str(work / "dynamic.onnx"), weight_type=QuantType.QInt8)
    out["int8 dynamic (weights only)"] = work / "dynamic.onnx"
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    import logging

    logging.getLogger().setLevel(logging.ERROR)  # the quantiser's advice on formats
    row, net, S, Z = current_model_splits()
    x = {s: network.to_input(S[s].images).numpy() for s in ("train", "test")}
    gallery = np.arange(len(Z["train"]))
    _, It = metrics.knn_search(Z["test"], Z["train"], k=K)
    # torch's k-th distance recomputed directly: knn_search's |q|^2 - 2qb + |b|^2 loses the
    # digits that near-ties need (it made float32 ONNX, 1e-7 from torch, look 0.983)
    Dt = np.sort(np.linalg.norm(Z["train"][It] - Z["test"][:, None], axis=2), axis=1)
    print(f"model {row.id} ({row.preset}); {len(x['train'])} train images embedded per round, "
          f"{len(x['test'])} test queries; {a.threads} threads")
    print("| runtime | images/s (median of 3) | max 1 - cosine vs torch | recall@10 vs torch | parity |")
    print("| --- | --- | --- | --- | --- |")
    import torch

    torch.set_num_threads(a.threads)
    network.embed(net, S["test"].images[:BATCH])
    rates = []
    for _ in range(3):
        t0 = time.perf_counter()
        network.embed(net, S["train"].images)  # torch's own batch (ModelConfig.inference_batch)
        rates.append(len(x["train"]) / (time.perf_counter() - t0))
    print(f"| torch eager (the reference) | {statistics.median(rates):,.0f} | 0 | 1 | |")
    with tempfile.TemporaryDirectory() as work:
        for name, path in variants(net, x["train"], Path(work)).items():
            sess = runtime.cpu_session(str(path), a.threads)  # the worker's session settings
            embed(sess, x["test"][:BATCH])  # warm-up
            rates = []
            for _ in range(3):
                t0 = time.perf_counter()
                zb = embed(sess, x["train"])
                rates.append(len(zb) / (time.perf_counter() - t0))
            zq = embed(sess, x["test"])
            gap = max(runtime.max_cosine_gap(Z["train"], zb), runtime.max_cosine_gap(Z["test"], zq))
            _, I = metrics.knn_search(zq, zb, k=K)
            rec = tie_aware_recall(Z["test"], I, Dt, gallery, Z["train"], K)
            ok = gap <= runtime.PARITY_COSINE and rec >= 0.99
            print(f"| {name} | {statistics.median(rates):,.0f} | {gap:.1e} | {rec:.4f} | {'holds' if ok else 'fails'} |",
                  flush=True)


if __name__ == "__main__":
    main()
