"""Honest evaluation of a registered model; results go to medsim.evaluations.

- Pair verification, in both pair modes: the distance threshold is chosen on
  validation pairs and applied unchanged to test pairs; ROC AUC on test pairs.
- Retrieval: test images query the train split (all subsets together), per subset:
  modality precision@10, label mAP@5, ACC@1, kNN-11 accuracy, next to a raw-pixel
  cosine baseline computed by the same code.
- Which datasets: any labelled one on file, trained on or not (evaluable.py), so an
  archive ingested after training is calibrated too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from medsim import registry
from medsim.errors import NotFound
from medsim.model import network
from medsim.queries import Q, one, scalar
from medsim.training import calibration, data, evaluable, metrics
from medsim.training.pairs import sample_pairs

PAIR_SEED_VAL, PAIR_SEED_TEST = 11, 12


def pair_verification(z_val, val: data.Split, z_test, test: data.Split, mode: str, n_pairs: int = 4000) -> dict:
    va, vb, vs = sample_pairs(val.dataset_ids, val.label_keys, n_pairs, mode, PAIR_SEED_VAL)
    ta, tb, ts = sample_pairs(test.dataset_ids, test.label_keys, n_pairs, mode, PAIR_SEED_TEST)
    dv = np.linalg.norm(z_val[va] - z_val[vb], axis=1)
    dt = np.linalg.norm(z_test[ta] - z_test[tb], axis=1)
    t, val_acc = metrics.best_threshold(dv, vs)
    return {"threshold": t, "val_acc": val_acc, "test_acc": metrics.pair_accuracy(dt, ts, t),
            "test_auc": metrics.roc_auc(-dt, ts), "n_pairs": n_pairs}


def pairs_possible(mode: str, *splits: data.Split) -> bool:
    """Negative pairs need two subsets (dataset mode) or two labels (label mode) in every
    split: one archive whose images all carry one label (a PACS labelled by Modality) has
    no label-mode pairs, though its retrieval and calibration are still measured."""
    return all(len(np.unique(s.dataset_ids)) > 1 or (mode == "label" and len(np.unique(s.label_keys)) > 1)
               for s in splits)


def retrieval(xq, q: data.Split, xb, b: data.Split, metric: str) -> dict:
    _, I = metrics.knn_search(xq, xb, k=11, metric=metric)
    out = {}
    for d in np.unique(q.dataset_ids):
        m = q.dataset_ids == d
        out[q.flags[int(d)]] = metrics.retrieval_metrics(I[m], q.dataset_ids[m], q.label_keys[m],
                                                         b.dataset_ids, b.label_keys)
    return out


def literature(xq, q: data.Split, xb, b: data.Split, metric: str, intervals: bool = True) -> dict:
    """Per subset: its test queries against its own train split (the published protocol)."""
    out = {}
    for d in np.unique(q.dataset_ids):
        qm, bm = q.dataset_ids == d, b.dataset_ids == d
        if not bm.any():
            continue
        _, I = metrics.knn_search(xq[qm], xb[bm], k=5, metric=metric)
        out[q.flags[int(d)]] = metrics.literature_metrics(I, q.label_keys[qm], b.label_keys[bm],
                                                          intervals=intervals)
    return out


def raw_pixels(split: data.Split) -> np.ndarray:
    return split.images.reshape(len(split), -1).astype(np.float32) / 255.0


def evaluate(conn, model_ref="current", device="cpu", store: bool = True, exclude_leaked: bool = False,
             out_dir="medsim_out", datasets=None) -> dict:
    """datasets: the flags to evaluate, trained on or not (default: evaluable.default_datasets);
    one that cannot be evaluated is a sentence in results["not_evaluated"], and none at all
    is a NotFound that says why for each."""
    row = registry.get(conn, model_ref)
    flags, not_evaluated = evaluable.choose(conn, row, datasets)
    if not flags:
        raise NotFound(f"nothing to evaluate for model {row.id}: " + "; ".join(not_evaluated.values()))
    net = row.load(conn, device)
    size = net.cfg.image_size
    train, val, test = (data.load_split(conn, [s], flags, input_size=size) for s in ("train", "val", "test"))
    excluded = 0
    if exclude_leaked:
        leaked = leaked_test_images(conn, row.id, flags)
        keep = np.array([int(i) not in leaked for i in test.ids])
        excluded = int((~keep).sum())
        test = data.Split(test.ids[keep], test.dataset_ids[keep], test.label_keys[keep],
                          [lab for lab, k in zip(test.labels, keep, strict=True) if k], test.images[keep],
                          test.flags, test.skipped, test.tasks)
    z = {name: network.embed(net, s.images, device=device) for name, s in
         (("train", train), ("val", val), ("test", test))}
    results = {
        "model_id": row.id, "preset": row.preset, "mode": row.mode, "datasets": flags,
        "trained_on": row.datasets, "not_evaluated": not_evaluated,
        "skipped_images": [i for s in (train, val, test) for i, _ in s.skipped],
        "excluded_leaked_queries": excluded if exclude_leaked else None,
        "pairs": {mode: pair_verification(z["val"], val, z["test"], test, mode)
                  for mode in ("dataset", "label") if pairs_possible(mode, val, test)},
        "retrieval": retrieval(z["test"], test, z["train"], train, "l2"),
        "baseline_raw_pixel_cosine": retrieval(raw_pixels(test), test, raw_pixels(train), train, "cosine"),
        # the published anchors' definitions (metrics.literature_metrics), with intervals
        "literature": literature(z["test"], test, z["train"], train, "l2"),
        "literature_baseline_raw_pixel_cosine": literature(raw_pixels(test), test, raw_pixels(train), train,
                                                           "cosine"),
        # distance -> P(same diagnosis), vote share -> P(vote right): fitted on val, ECE on test
        "calibration": calibration.fit(z, {"train": train, "val": val, "test": test}, out_dir, row.id,
                                       facts=image_facts(conn, train, val, test)),
    }
    if store:
        calibration.store(conn, row.id, results["calibration"])
        results["evaluation_id"] = scalar(
            conn, Q.insert_evaluation, {"model_id": row.id, "seed": PAIR_SEED_TEST,
                                        "results": json.dumps(calibration.without_files(results))})
    return results


def image_facts(conn, *splits: data.Split) -> dict:
    """image id -> (patient key, label name as a search shows it), for calibration."""
    ids = [int(i) for s in splits for i in s.ids]
    return {r[0]: (r[1], r[2]) for r in conn.execute(Q.image_facts, {"ids": ids})}


def leaked_test_images(conn, model_id: int, datasets: list[str]) -> set[int]:
    """Test images with an exact or near duplicate, or their patient, in train or val of
    these datasets (the model's latest `medsim audit`)."""
    return {r[0] for r in conn.execute(Q.leaked_test_images, {"model_id": model_id, "datasets": list(datasets)})}


@dataclass
class Stored:
    id: int
    results: dict


def latest(conn, model_id: int) -> dict | None:
    """The model's most recent stored evaluation (its results), if any."""
    r = one(conn, Q.latest_evaluation, {"model_id": model_id}, as_=Stored)
    return None if r is None else {**r.results, "evaluation_id": r.id}


def format_table(r: dict) -> str:
    trained = r.get("trained_on")
    lines = [f"model {r['model_id']} ({r['preset']}, {r['mode']} mode) on {', '.join(r['datasets'])}"
             + (f" (trained on {', '.join(trained) or 'nothing here: imported'})" if trained is not None and trained != r["datasets"] else ""),
             *(r.get("not_evaluated") or {}).values(), ""]
    if r.get("excluded_leaked_queries") is not None:
        lines[-1:-1] = [f"test queries left out as leaked (latest medsim audit): {r['excluded_leaked_queries']}"]
    lines.append("pair verification (threshold chosen on val pairs, applied to test pairs)")
    lines.append(f"  {'pairs':8s} {'threshold':>9s} {'val acc':>8s} {'test acc':>9s} {'test AUC':>9s}")
    for mode in sorted(r["pairs"]):  # jsonb does not keep key order
        p = r["pairs"][mode]
        lines.append(f"  {mode:8s} {p['threshold']:9.4f} {p['val_acc']:8.2%} {p['test_acc']:9.2%} {p['test_auc']:9.4f}")
    lines.append("")
    lines.append("retrieval: test queries vs train gallery (model | raw-pixel cosine baseline)")
    hdr = ["modality_p@10", "label_map@5", "acc@1", "knn11_acc"]
    lines.append(f"  {'subset':16s}" + "".join(f"{h:>22s}" for h in hdr) + f"{'queries':>9s}")
    for flag, m in r["retrieval"].items():
        base = r["baseline_raw_pixel_cosine"][flag]
        cells = "".join(f"{m[h]:>12.2%} |{base[h]:>7.2%}" for h in hdr)
        lines.append(f"  {flag:16s}{cells}{m['n_queries']:>9d}")
    if r.get("literature"):
        lines += ["", "retrieval, the literature's definitions (Mahbod et al. 2024, masih4/MedImageRetrieval "
                      "metric.py): test vs the same subset's train split; AP@5 over the hits in the top 5; "
                      "[bootstrap 95% interval] | raw-pixel baseline"]
        names = ["map@5", "acc@1", "acc@3", "acc@5", "mmv@5"]
        lines.append(f"  {'subset':16s}" + "".join(f"{n:>27s}" for n in names))
        for flag, m in r["literature"].items():
            base = r["literature_baseline_raw_pixel_cosine"].get(flag, {})
            cells = "".join(f"{m[n]:>8.2%} [{m['ci95'][n][0]:.3f},{m['ci95'][n][1]:.3f}] |{base.get(n, float('nan')):>6.1%}"
                            for n in names)
            lines.append(f"  {flag:16s}{cells}")
    if r.get("calibration"):
        lines += ["", "calibration (fitted on val -> train neighbours, k=10; expected calibration error on test)"]
        lines.append(f"  {'subset':16s}{'P(same) = 1/(1+exp(-(a+b*d)))':>32s}{'ECE val':>9s}{'ECE test':>9s}"
                     f"{'vote ECE test':>14s}")
        for flag, c in r["calibration"].items():
            lines.append(f"  {flag:16s}{'a=' + format(c['a'], '.2f') + ', b=' + format(c['b'], '.2f'):>32s}"
                         f"{c['ece_val']:9.3f}{c['ece_test']:9.3f}{c['vote_ece_test']:14.3f}")
        if any(c.get("by_k_test") for c in r["calibration"].values()):
            lines += ["", "calibration at each k (test ECE [bootstrap 95%]; the vote: claimed vs right; "
                          "unlike anything on file: nearest neighbour past 99% of val and train's)"]
            lines.append(f"  {'subset':16s}{'k':>4s}{'P(same) ECE':>24s}{'vote ECE':>24s}{'claimed':>9s}{'right':>7s}"
                         f"{'unlike':>8s}")
            for flag, c in r["calibration"].items():
                for k, m in (c.get("by_k_test") or {}).items():
                    ps = f"{m['p_same_ece']:.3f} [{m['p_same_ece_ci95'][0]:.3f},{m['p_same_ece_ci95'][1]:.3f}]"
                    vo = f"{m['vote_ece']:.3f} [{m['vote_ece_ci95'][0]:.3f},{m['vote_ece_ci95'][1]:.3f}]"
                    lines.append(f"  {flag:16s}{k:>4s}{ps:>24s}{vo:>24s}{m['vote_claimed']:9.3f}{m['vote_right']:7.3f}"
                                 f"{c['ood_share_test']:8.1%}")
        lines += checks_table(r["calibration"])
        png = next((c["diagram_png"] for c in r["calibration"].values() if c.get("diagram_png")), None)
        if png:
            lines.append(f"  reliability diagram: {png}; the vote at each k: "
                         f"{png.rsplit('/', 1)[0]}/reliability-by-k.png")
    return "\n".join(lines)


def checks_table(cal: dict) -> list[str]:
    """Issue 37's checks on test, per subset and k: the diagnosis set's coverage at 80/90/95%
    and its mean size, the vote's ECE (isotonic P(right)) and its worst over-claim (claimed -
    right) over vote shares with >= 20 queries."""
    if not any(c.get("checks_test") for c in cal.values()):
        return []
    lines = ["", "diagnosis set (conformal, fitted on val; queries see no image of their own patient nor a near "
                 "copy) and the vote's P(right) (isotonic), on test",
             f"  {'subset':16s}{'k':>4s}" + "".join(f"{'cov@' + format(lv, '.0%'):>9s}{'size':>6s}"
                                                    for lv in (0.8, 0.9, 0.95))
             + f"{'vote ECE':>10s}{'worst claimed-right':>21s}{'ties':>6s}"]
    for flag, c in cal.items():
        ch = c.get("checks_test") or {}
        sets, vote = ch.get("set") or {}, ch.get("vote") or {}
        for k in sorted({*next(iter(sets.values()), {}), *vote}, key=int):
            cells = ""
            for lv in ("0.8", "0.9", "0.95"):
                m = (sets.get(lv) or {}).get(k)
                cells += f"{m['coverage']:9.1%}{m['mean_size']:6.2f}" if m else f"{'':>15s}"
            v = vote.get(k) or {}
            worst = f"{v['worst']:+.3f}" if v.get("worst") is not None else "-"
            ece = f"{v['ece']:.3f}" if v.get("ece") is not None else "-"
            lines.append(f"  {flag:16s}{k:>4s}{cells}{ece:>10s}{worst:>21s}{v.get('ties', 0):>6d}")
    return lines
