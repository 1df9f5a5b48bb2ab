"""Models side by side, by dataset: what a team reads to decide which model to promote.

Per model and dataset: mAP@5 and ACC@1 (the literature's definitions, from the latest
stored evaluation that measured that dataset), the calibration's test ECE (P(same) and the
vote, from the stored calibration report), embedding coverage (embedded / images on file).
Per model: checkpoint size, input size (its config's image_size) and embedding time per
image, measured here: every model embeds the same probe batch (the first PROBE stored
images by id, each converted to the model's own input before the clock starts) with the
runtime the worker would use (runtime.prepare: ONNX Runtime where it matches torch, else
torch), on `threads` CPU threads; one warm-up pass, then the best of REPEATS passes.
The CLI (`medsim models compare`) and the service (GET /models/compare) both call run().
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from medsim import queue, registry
from medsim.errors import NotFound
from medsim.images import StoredRow
from medsim.queries import Q, rows
from medsim.training import evaluable

PROBE = 256
REPEATS = 3


@dataclass
class DatasetFigures:
    dataset: str
    images: int
    embedded: int
    map5: float | None = None
    acc1: float | None = None
    queries: int | None = None  # test queries behind map5 / acc1
    evaluation_id: int | None = None
    ece: float | None = None  # P(same | distance), test
    vote_ece: float | None = None  # P(the vote is right), test

    @property
    def coverage(self) -> float:
        return self.embedded / self.images if self.images else 0.0


@dataclass
class ModelFigures:
    id: int
    name: str
    is_current: bool
    datasets: list  # trained on
    input_size: int | None
    checkpoint_bytes: int
    ms_per_image: float | None = None
    runtime: str | None = None
    by_dataset: list[DatasetFigures] = field(default_factory=list)

    @property
    def evaluated(self) -> bool:
        return any(d.evaluation_id is not None for d in self.by_dataset)


@dataclass
class Comparison:
    models: list[ModelFigures]
    timing: str | None  # how ms_per_image was measured (None: not measured)
    not_evaluable: dict[str, str] = field(default_factory=dict)  # dataset -> why no model can be evaluated on it
    to_fill: list[str] = field(default_factory=list)  # the `medsim evaluate` commands that fill the '-'

    def as_dict(self) -> dict:
        out = asdict(self)
        for m, md in zip(self.models, out["models"], strict=True):
            for d, dd in zip(m.by_dataset, md["by_dataset"], strict=True):
                dd["coverage"] = d.coverage
        return out


@dataclass
class _Model:
    id: int
    name: str
    is_current: bool
    datasets: list
    input_size: int | None
    checkpoint_bytes: int


@dataclass
class _Evaluation:
    model_id: int
    dataset: str
    evaluation_id: int
    map5: float | None
    acc1: float | None
    queries: int | None


@dataclass
class _Calibration:
    model_id: int
    dataset: str
    ece: float | None
    vote_ece: float | None


def run(conn, model_ids=None, measure: bool = True, threads: int = 1, probe: int = PROBE) -> Comparison:
    """Every model on file, or those named (ids), by dataset. measure=False leaves the
    embedding time out (it loads each model; the rest is a few reads)."""
    ids = None if model_ids is None else [registry.model_id(m) for m in model_ids]
    found = rows(conn, Q.compare_models, {"ids": ids}, as_=_Model)
    if ids is not None:
        missing = sorted(set(ids) - {m.id for m in found})
        if missing:
            raise NotFound(f"no model with id {', '.join(map(str, missing))} (`medsim models` lists them)")
    ids = [m.id for m in found]
    evals = {(e.model_id, e.dataset): e for e in rows(conn, Q.compare_evaluations, {"ids": ids}, as_=_Evaluation)}
    cals = {(c.model_id, c.dataset): c for c in rows(conn, Q.compare_calibrations, {"ids": ids}, as_=_Calibration)}
    coverage = {(s.model_id, s.dataset): s for s in queue.status(conn) if s.model_id in set(ids)}
    models = []
    for m in found:
        mf = ModelFigures(m.id, m.name, m.is_current, list(m.datasets or []), m.input_size, m.checkpoint_bytes)
        for (mid, flag), s in sorted(coverage.items()):
            if mid != m.id:
                continue
            d = DatasetFigures(flag, s.total, s.embedded)
            if (e := evals.get((mid, flag))) is not None:
                d.map5, d.acc1, d.queries, d.evaluation_id = e.map5, e.acc1, e.queries, e.evaluation_id
            if (c := cals.get((mid, flag))) is not None:
                d.ece, d.vote_ece = c.ece, c.vote_ece
            mf.by_dataset.append(d)
        models.append(mf)
    shown = sorted({d.dataset for m in models for d in m.by_dataset})
    ready = {r.dataset: r for r in rows(conn, Q.evaluable_datasets, {"flags": shown, "size": 28},
                                        as_=evaluable.Readiness)}
    not_evaluable = {f: why for f in shown if (why := evaluable.why_not(ready.get(f), f)) is not None}
    timing = None
    if measure and models:
        batch = rows(conn, Q.probe_images, {"n": probe}, as_=StoredRow)
        for mf in models:
            mf.ms_per_image, mf.runtime, n = embedding_time(conn, mf.id, batch, threads)
        timing = (f"ms/image: {n} stored images (the first by id, each model's own input size) embedded with "
                  f"the model's runtime on {threads} CPU thread{'s' if threads > 1 else ''}, best of {REPEATS} "
                  f"passes after a warm-up") if batch else None
    return Comparison(models, timing, not_evaluable, fill_commands(models, not_evaluable))


def fill_commands(models: list[ModelFigures], not_evaluable: dict) -> list[str]:
    """Per model with a '-' that an evaluation can fill, the command that does: plain where
    its default datasets (evaluable.default_datasets) cover them, else naming them."""
    out = []
    for m in models:
        missing = [d.dataset for d in m.by_dataset if d.evaluation_id is None and d.dataset not in not_evaluable]
        if not missing:
            continue
        cover = set(m.datasets) | {d.dataset for d in m.by_dataset if d.embedded > 0}
        named = m.evaluated or not set(missing) <= cover
        out.append(f"medsim evaluate --model {m.id}" + (f" --datasets {' '.join(missing)}" if named else ""))
    return out


def embedding_time(conn, model_id: int, batch: list[StoredRow], threads: int) -> tuple[float | None, str, int]:
    """-> (ms per image, the runtime's name, images timed) for one model on the probe batch."""
    from medsim.model import runtime

    row = registry.get(conn, model_id)
    rt = runtime.prepare(row.load(conn), threads=threads)
    size = row.config["image_size"]
    xs = []
    for r in batch:
        try:
            xs.append(r.model_input(size))
        except ValueError:  # a row stored broken is no part of any model's time
            continue
    if not xs:
        return None, rt.name, 0
    x = np.stack(xs)  # (n, size, size, 3) uint8
    rt.embed(x)
    best = float("inf")
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        rt.embed(x)
        best = min(best, time.perf_counter() - t0)
    return best / len(x) * 1000, rt.name, len(x)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def size_text(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def format_table(c: Comparison) -> str:
    lines = ["models by dataset: mAP@5 and ACC@1 from the latest stored evaluation of each dataset (the "
             "literature's definitions: test queries vs the dataset's own train split); ECE on test of the stored "
             "calibration, P(same) / the vote; coverage: embedded / images on file"]
    if c.timing:
        lines.append(c.timing)
    lines.append("")
    lines.append(f"  {'model':>5s} {'name':16s} {'checkpoint':>10s} {'input':>5s} {'ms/image':>14s}  {'dataset':16s}"
                 f"{'mAP@5':>7s}{'ACC@1':>7s}{'ECE':>7s}{'voteECE':>8s}{'coverage':>20s}")
    for m in c.models:
        head = (f"{'*' if m.is_current else ' '} {m.id:>5d} {m.name[:16]:16s} {size_text(m.checkpoint_bytes):>10s} "
                f"{m.input_size or '-':>5} {_num(m.ms_per_image, '.3f') + (f' {m.runtime}' if m.runtime else ''):>14s}")
        if not m.by_dataset:
            lines.append(f"{head}  (no images on file)")
        for i, d in enumerate(m.by_dataset):
            cov = f"{d.embedded}/{d.images} {_pct(d.coverage)}"
            lines.append(f"{head if i == 0 else ' ' * len(head)}  {d.dataset[:16]:16s}{_pct(d.map5):>7s}"
                         f"{_pct(d.acc1):>7s}{_num(d.ece, '.3f'):>7s}{_num(d.vote_ece, '.3f'):>8s}{cov:>20s}")
    if c.to_fill:
        lines += ["", "'-': no stored evaluation of that dataset; " + ", ".join(f"`{cmd}`" for cmd in c.to_fill)
                  + (" fills it" if len(c.to_fill) == 1 else " fill them")]
    if c.not_evaluable:
        lines += ["", *c.not_evaluable.values()]
    lines.append("* the current model")
    return "\n".join(lines)
