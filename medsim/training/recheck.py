"""`medsim calibration check --since DATE`: the stored calibration measured where it is
used, on labelled images ingested at or after DATE (queries the fit never saw) against
the train images ingested before it (the gallery it was fitted against), each query's own
patient left out: the diagnosis set's empirical coverage and mean size, the vote's ECE and
worst over-claim per k. Where coverage falls more than TOLERANCE short of the level, the
answer says "not verified on recent images" (a drifted archive, a new scanner, another
hospital), and the result is kept in the calibration's report (recent_check)."""

from __future__ import annotations

import json
from datetime import datetime

import numpy as np

from medsim import registry
from medsim.errors import NotFound
from medsim.queries import Q
from medsim.training import calibration, conformal, unseen, vote_model

TOLERANCE = 0.02
KS = (5, 10, 20)


def check(conn, model_ref, since: datetime, coverage: float = conformal.DEFAULT_COVERAGE, ks=KS,
          store: bool = True) -> dict:
    row = registry.get(conn, model_ref)
    cals = calibration.load(conn, row.id)
    if not cals:
        raise NotFound(f"model {row.id} has no calibration: run `medsim evaluate --model {row.id}` first")
    out = {"model_id": row.id, "since": since.isoformat(), "coverage": conformal.level_for(coverage), "datasets": {}}
    for flag, cal in cals.items():
        rs = conn.execute(Q.calibration_check_vectors, {"model_id": row.id, "dataset": flag, "since": since}).fetchall()
        recent = np.array([r[1] for r in rs], bool)
        doc = {"n": int(recent.sum())}
        if not recent.any() or recent.all() or not cal.conformal:
            doc["verdict"] = ("no calibration set fitted: run `medsim evaluate` again" if not cal.conformal else
                              f"no labelled {flag} image ingested since {since:%Y-%m-%d}" if not recent.any() else
                              f"no {flag} training image ingested before {since:%Y-%m-%d} to search among")
            out["datasets"][flag] = doc
            continue
        z = np.stack([r[4].to_numpy() for r in rs]).astype(np.float32)
        labels = np.array([r[3] for r in rs], object)
        patients = [r[2] for r in rs]
        qi, bi = np.flatnonzero(recent), np.flatnonzero(~recent)
        kmax = min(max(ks), len(bi))
        D, I, left = unseen.knn(z[qi], z[bi], kmax, [patients[i] for i in qi], [patients[i] for i in bi])
        L, q = labels[bi][I], labels[qi]
        names = {n: n for n in cal.conformal["labels"]}
        doc["set"] = conformal.check(cal.conformal, L, q, names, ks, coverage, D)
        doc["vote"] = {k: {x: v[x] for x in ("worst", "ece", "ties")}
                       for k, v in vote_model.overclaim_by_k(D, L, q, cal.vote_iso_by_k or {}, calibration.ece, ks).items()}
        doc["left_out"] = left
        short = [k for k, m in doc["set"].items() if m["coverage"] < m["level"] - TOLERANCE]
        doc["verified"] = not short
        doc["verdict"] = ("verified on recent images" if not short else
                          "not verified on recent images: the set covered " + ", ".join(
                              f"{doc['set'][k]['coverage']:.1%} at k = {k}" for k in short)
                          + f" of {doc['n']} images ingested since {since:%Y-%m-%d} (asked {out['coverage']:.0%})")
        if store:
            conn.execute(Q.store_calibration_check, {"model_id": row.id, "dataset": flag,
                                                      "check": json.dumps({**doc, "since": out["since"]})})
        out["datasets"][flag] = doc
    return out


def format_check(r: dict) -> str:
    lines = [f"model {r['model_id']}: calibration on labelled images ingested since {r['since'][:10]} "
             f"(the diagnosis set at {r['coverage']:.0%}; queries against train images ingested before)"]
    for flag, d in r["datasets"].items():
        lines.append(f"  {flag}: {d['verdict']}")
        for k, m in (d.get("set") or {}).items():
            v = (d.get("vote") or {}).get(k) or {}
            worst = f"{v['worst']:+.3f}" if v.get("worst") is not None else "-"
            ece = f"{v['ece']:.3f}" if v.get("ece") is not None else "-"
            lines.append(f"    k={k:>2s}  coverage {m['coverage']:6.1%}  mean set size {m['mean_size']:.2f}  "
                         f"vote ECE {ece}  worst claimed-right {worst}  ({m['n']} queries)")
    return "\n".join(lines)
