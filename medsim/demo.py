"""`medsim demo`: the whole pipeline, end to end, reusing whatever is already done.

database -> migrate -> ingest -> train -> embed -> FAISS indexes -> recall -> evaluation
-> curves and a montage with one query per subset.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from medsim import db, migrate, registry
from medsim.errors import DataMissing, DataRefused, MedsimError, NotFound, StaleIndex
from medsim.search import faiss_index, pipeline, present, promotion, recall
from medsim.search.context import Context
from medsim.search.index_kinds import KINDS
from medsim.search.request import ById, Request
from medsim.sources import ingest
from medsim.training import evaluate, train

STARTING_FOUR = ("dermamnist", "pneumoniamnist", "retinamnist", "breastmnist")


@dataclass
class DemoConfig:
    flags: tuple = STARTING_FOUR
    data_dir: str | None = None
    accept_unofficial: bool = False
    allow_download: bool = True
    out_dir: str = "medsim_out"
    train: train.TrainConfig | None = None
    recall_ks: tuple = (1, 10, 100)
    database_url: str | None = None
    progress: bool = True


def step(name: str, log) -> None:
    log(f"\n== {name}")


def run(cfg: DemoConfig, log=print) -> dict:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    outputs: dict = {}
    t_all = time.perf_counter()

    step("database", log)
    url = cfg.database_url or db.database_url()
    log(f"using {db.source() if cfg.database_url is None else 'the given URL'}")
    migrate.upgrade(url)
    log(f"schema at revision {migrate.current(url)}")

    with db.connect(url, autocommit=True) as conn:
        step("ingest", log)
        flags, missing = [], {}
        for flag in cfg.flags:
            try:
                r = ingest.ingest(conn, flag, data_dir=cfg.data_dir, accept_unofficial=cfg.accept_unofficial,
                                  allow_download=cfg.allow_download, show_progress=cfg.progress)
                log(r.line())
                flags.append(flag)
            except MedsimError as err:  # a missing or refused subset is skipped, not fatal
                missing[flag] = str(err)
                log(f"{flag}: SKIPPED: {err}")
        if not flags:
            raise DataMissing("none of the subsets could be ingested; see the messages above")

        step("train", log)
        tcfg = cfg.train or train.TrainConfig()
        tcfg.flags = sorted(flags)
        model_id = registry.reusable(conn, tcfg)
        if model_id is not None:
            log(f"reusing model {model_id} ({tcfg.preset}, {tcfg.mode} mode, trained on {', '.join(tcfg.flags)})")
            outputs["curves"] = train.plot_curves(registry.epoch_history(conn, model_id), out / f"model-{model_id}")
        else:
            model_id = train.train(conn, tcfg, out_dir=out, progress=cfg.progress, log=log)
            outputs["curves"] = [out / f"model-{model_id}" / f"{n}.png" for n in ("loss", "accuracy")]

        step("embed (python -m medsim.embed_worker --once)", log)
        from medsim.worker import Worker, WorkerConfig

        s = Worker(WorkerConfig(model=str(model_id), once=True, database_url=url, progress=cfg.progress)).run()
        log(f"worker: {s.line()}")
        if not registry.get(conn, model_id).is_current:  # a retrain: searches used the old model until now
            p = promotion.promote(conn, model_id, by="(medsim demo)", say=log)
            log(f"model {model_id} promoted: its gallery is complete (it replaced model {p.previous_id})")

        step("FAISS indexes (from medsim.gallery) and recall vs pgvector exact search", log)
        builds = []
        for kind in KINDS:
            try:
                b = faiss_index.load_build(conn, faiss_index.latest_build(conn, model_id, kind), model_ref=model_id)
                log(f"{kind}: reusing {b.path} (checksum and fingerprint match)")
            except (NotFound, StaleIndex, DataRefused):
                b = faiss_index.build(conn, model_id, kind, out_dir=out)
                log(f"{kind}: built {b.meta['n_rows']} vectors in {b.meta['build_seconds']:.2f}s -> {b.path}")
            builds.append(b)
        rep = recall.report(conn, builds, ks=cfg.recall_ks)
        log(recall.format_table(rep))
        outputs["recall_json"] = out / f"recall-model{model_id}.json"
        outputs["recall_json"].write_text(json.dumps(rep, indent=2))

        step("evaluation (test pairs and test-vs-train retrieval)", log)
        prior = evaluate.latest(conn, model_id)
        if prior is not None and "calibration" not in prior:
            prior = None  # stored before calibration existed: evaluate again, which fits it
        ev = prior or evaluate.evaluate(conn, model_id, out_dir=out)
        log(("(stored evaluation reused)\n" if prior else "") + evaluate.format_table(ev))

        step("montage: one test query per subset", log)
        ctx = Context(conn)
        results = [pipeline.run(ctx, Request(ById(i), k=4, model=model_id))
                   for i in pipeline.example_queries(conn, flags)]
        log(present.table(results))
        outputs["montage"] = present.montage(conn, results, out / f"montage-model{model_id}.png")

    log(f"\n== done in {time.perf_counter() - t_all:.0f}s")
    if missing:
        log("not ingested: " + "; ".join(f"{f} ({m.split(';')[0]})" for f, m in missing.items()))
    log(f"database: {db.source() if cfg.database_url is None else cfg.database_url}")
    for name, value in outputs.items():
        for p in value if isinstance(value, list) else [value]:
            log(f"{name:12s} {Path(p).resolve()}")
    log(f"{'indexes':12s} {(out / 'indexes').resolve()}")
    m = f"{_venv_hint()}medsim" + ("" if cfg.database_url is None else f" --database-url '{cfg.database_url}'")
    log(f"\nsearch it in your browser: a user and a token first (the page asks for it), then the service:\n"
        f"  {m} user add me && {m} grant me --all && {m} token create me\n"
        f"  {m} serve   then open http://127.0.0.1:8000/")
    return {"model_id": model_id, "present": flags, "missing": missing, "outputs": outputs,
            "recall": rep, "evaluation": ev}


def _venv_hint() -> str:
    """`.venv/bin/` when medsim runs from the repository's venv (make demo) and the venv is not
    on PATH, so the printed command works as pasted."""
    import shutil
    import sys

    exe = Path(sys.executable)
    if shutil.which("medsim") or exe.parent.name != "bin":
        return ""
    try:
        return f"{exe.parent.relative_to(Path.cwd())}/"
    except ValueError:
        return f"{exe.parent}/"
