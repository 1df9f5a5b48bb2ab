"""Calibrated answers: a neighbour's distance -> the probability that it shares the
query's diagnosis, and the neighbours' vote -> the probability that the vote is right.

A distance alone means nothing to a clinician. Per dataset, two one-feature logistic
fits (monotone, two parameters each, so they cannot overfit a small validation split):
- **neighbour**: P(same label | distance), on the pairs a search produces: every
  validation image against its 10 nearest training images of the same dataset;
- **vote**: P(the majority label of the 10 nearest is the query's label | the share of
  the 10 that voted for it), on the same validation queries.

Since issue 37 the vote's P(right) is isotonic in the vote share per k (vote_model.
fit_isotonic: checked per share against held-out accuracy), a tie claims no label, a
diagnosis set with a coverage guarantee stands beside the vote (conformal.py), and the
validation and test queries' neighbours leave out their own patient's images and near
copies of them (unseen.py), as a new patient's search would.

Fitted on validation only; expected calibration error (10 equal-width bins) and a
reliability diagram come from the test split, queried the same way. Stored per model and
dataset in medsim.calibrations; searches (CLI, JSON, HTTP) and the SQL function
medsim.p_same_label() read them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medsim.queries import Q, rows
from medsim.training import conformal, recent, unseen, vote_model

K_FIT = 10
BINS = 10


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-3, iters: int = 50) -> tuple[float, float]:
    """P(y = 1 | x) = sigmoid(a + b x): the one-feature case of vote_model's Newton fit
    (a tiny ridge keeps separable data finite) -> (a, b)."""
    a, b = vote_model.fit_logistic(np.asarray(x, np.float64)[:, None], y, l2=l2, iters=iters)
    return a, b


def sigmoid(a: float, b: float, x) -> np.ndarray:
    return 1 / (1 + np.exp(-(a + b * np.asarray(x, np.float64))))


def ece(p: np.ndarray, y: np.ndarray, bins: int = BINS) -> tuple[float, list]:
    """Expected calibration error over equal-width bins -> (ece, [(mean p, freq, n)])."""
    p, y = np.asarray(p), np.asarray(y, np.float64)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    out, total = [], 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            out.append((float(p[m].mean()), float(y[m].mean()), int(m.sum())))
            total += m.sum() / len(p) * abs(p[m].mean() - y[m].mean())
    return float(total), out


def neighbour_pairs(D, I, q_labels, b_labels, k: int = K_FIT):
    """A kNN's first k columns (nearest first) -> (distances, same) for each query's k
    nearest gallery images, and per query (vote share of the majority label, whether it
    is the query's label)."""
    D, labels = D[:, :k], b_labels[I[:, :k]]
    same = labels == q_labels[:, None]
    shares, right = [], []
    for row_labels, ql in zip(labels, q_labels, strict=True):
        values, counts = np.unique(row_labels, return_counts=True)
        top = values[np.argmax(counts)]  # ties: the smallest label key, deterministically
        shares.append(counts.max() / len(row_labels))
        right.append(top == ql)
    return D.ravel(), same.ravel(), np.array(shares), np.array(right)


@dataclass
class Calibration:
    dataset: str
    a: float
    b: float
    vote_a: float
    vote_b: float
    vote_by_k: dict | None = None  # {k: weights}: the vote at every k (vote_model); None: fitted before it
    ood_d1: float | None = None  # nearest-neighbour distance past which a query is unlike anything on file
    vote_iso_by_k: dict | None = None  # {k: isotonic P(right | share)} (issue 37); None: fitted before it
    conformal: dict | None = None  # the diagnosis set's thresholds (conformal.fit); None: fitted before it
    recent_check: dict | None = None  # the latest `medsim calibration check` (recheck); None: never checked

    def p_same(self, distance: float) -> float:
        return float(sigmoid(self.a, self.b, distance))

    def vote_confidence(self, share: float, distance: float, k: int) -> tuple[float | None, int | None]:
        """P(the vote of k neighbours is right) -> (probability, the k it was fitted at),
        or (None, None) where no fit holds for this k."""
        iso = vote_model.weights_at(self.vote_iso_by_k or {}, k)
        if iso is not None and iso[1]["x"]:
            return float(vote_model.predict_isotonic(iso[1], share)), iso[0]
        found = vote_model.weights_at(self.vote_by_k or {}, k)
        if found is not None:
            return float(vote_model.predict(found[1], [share, distance])[0]), found[0]
        if k == K_FIT:  # a calibration stored before per-k fits: valid at k = 10 only
            return float(sigmoid(self.vote_a, self.vote_b, share)), K_FIT
        return None, None


def fit(z: dict, splits: dict, out_dir: Path | str | None = None, model_id: int | None = None,
        facts: dict | None = None) -> dict:
    """Per dataset: fit on val -> train, measure on test -> train. `z` and `splits` are
    evaluate()'s embeddings and data.Split objects by split name -> {flag: figures}.
    facts: image id -> (patient key, label name) (evaluate reads them): a query's own
    patient is left out of its neighbours, and the diagnosis set names labels as a search
    shows them (without: the label vector as text)."""

    train, val, test = splits["train"], splits["val"], splits["test"]
    out = {}
    for d in np.unique(val.dataset_ids):
        flag = val.flags[int(d)]
        bm, vm, tm = train.dataset_ids == d, val.dataset_ids == d, test.dataset_ids == d
        if bm.sum() < K_FIT or vm.sum() < 2 or tm.sum() < 2:
            continue
        # one kNN per split, as deep as the deepest k any fit or report needs
        kmax = min(max(vote_model.K_GRID), int(bm.sum()))
        # as a new patient: no image of the query's own patient, no near copy of it
        Dv, Iv, left_v = _as_new_patient(z, splits, "val", vm, bm, kmax, facts)
        Dt, It, left_t = _as_new_patient(z, splits, "test", tm, bm, kmax, facts)
        b_keys = train.label_keys[bm]
        dv, sv, share_v, right_v = neighbour_pairs(Dv, Iv, val.label_keys[vm], b_keys)
        dt, st, share_t, right_t = neighbour_pairs(Dt, It, test.label_keys[tm], b_keys)
        a, b = fit_logistic(dv, sv)
        va, vb = fit_logistic(share_v, right_v)
        e_val, _ = ece(sigmoid(a, b, dv), sv)
        e_test, diagram = ece(sigmoid(a, b, dt), st)
        ev_test, vote_diagram = ece(sigmoid(va, vb, share_t), right_t)
        # the vote at every k, and the out-of-distribution rule
        by_k = vote_model.fit_by_k(Dv, b_keys[Iv], val.label_keys[vm])
        iso = vote_model.fit_isotonic_by_k(Dv, b_keys[Iv], val.label_keys[vm])  # what searches claim (issue 37)
        ood = vote_model.ood_threshold(Dv[:, 0], vote_model.train_nearest(z["train"][bm]))
        out[flag] = {"method": "logistic", "a": a, "b": b, "vote_a": va, "vote_b": vb, "k_fit": K_FIT,
                     "n_val_pairs": int(len(dv)), "n_test_pairs": int(len(dt)),
                     "ece_val": e_val, "ece_test": e_test, "vote_ece_test": ev_test,
                     "reliability_test": diagram, "vote_reliability_test": vote_diagram,
                     "base_rate_test": float(np.mean(st)),
                     "vote_by_k": by_k, "ood_d1": ood, "ood_share_test": float(np.mean(Dt[:, 0] > ood)),
                     "by_k_test": vote_model.report_by_k(Dt, b_keys[It], test.label_keys[tm], by_k,
                                                         lambda x, a=a, b=b: sigmoid(a, b, x), ece, iso)}
        names = _label_names(splits, facts, (bm, vm, tm))
        conf = conformal.fit(b_keys[Iv], val.label_keys[vm], names, Dv)
        out[flag].update({
            "vote_iso_by_k": iso, "conformal": conf, "left_out_val": left_v, "left_out_test": left_t,
            "checks_test": {"set": {str(c): conformal.check(conf, b_keys[It], test.label_keys[tm], names,
                                                            conformal.CHECK_KS, c, Dt)
                                    for c in conformal.CHECK_LEVELS} if conf else {},
                            "vote": vote_model.overclaim_by_k(Dt, b_keys[It], test.label_keys[tm], iso, ece)}})
    if out_dir is not None and out:
        png = reliability_png(out, Path(out_dir), model_id)
        vote_model.reliability_by_k_png(out, png.with_name("reliability-by-k.png"))
        out[next(iter(out))]["diagram_png"] = str(png)
    return out


def _as_new_patient(z, splits, name, qm, bm, k, facts):
    """The split's queries (mask qm) against the train gallery (mask bm), leaving out each
    query's own patient and near copies (unseen.knn)."""
    q, b = splits[name], splits["train"]
    grey = lambda s, m: s.images[m].mean(axis=-1)  # noqa: E731 (the audit's grey: channel mean at the model's input)
    copies = unseen.near_copy_rows(grey(q, qm), z[name][qm], grey(b, bm), z["train"][bm])
    patient = (lambda s, m: [(facts.get(int(i)) or (None,))[0] for i in s.ids[m]]) if facts else None
    return unseen.knn(z[name][qm], z["train"][bm], k, patient(q, qm) if patient else None,
                      patient(b, bm) if patient else None, copies)


def _label_names(splits, facts, masks) -> dict:
    """label key -> the name a search shows for it (facts), or the label vector as text."""
    names = {}
    for s, m in zip((splits["train"], splits["val"], splits["test"]), masks, strict=True):
        for i, key, lab in zip(s.ids[m], s.label_keys[m], [x for x, keep in zip(s.labels, m, strict=True) if keep],
                               strict=True):
            name = (facts or {}).get(int(i), (None, None))[1]
            names.setdefault(int(key), name if name is not None else ",".join(map(str, lab)))
    return names


def reliability_png(cal: dict, out_dir: Path, model_id: int | None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4), dpi=100)
    for ax, key, title in ((axes[0], "reliability_test", "neighbour: P(same label | distance)"),
                           (axes[1], "vote_reliability_test", "vote: P(majority of 10 is right | share)")):
        ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1)
        for flag, c in cal.items():
            pts = np.array([(p, f) for p, f, _ in c[key]])
            e = c["ece_test"] if key == "reliability_test" else c["vote_ece_test"]
            ax.plot(pts[:, 0], pts[:, 1], marker="o", label=f"{flag} (ECE {e:.3f})")
        ax.set_xlabel("predicted probability (fitted on val)")
        ax.set_ylabel("observed frequency (test)")
        ax.set_title(title, fontsize=10)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path = out_dir / (f"model-{model_id}" if model_id is not None else ".") / "reliability.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def without_files(doc):
    """A copy to store: the reliability diagram's file is where this machine wrote it, a
    server path the database (and its read-only role) has no business knowing."""
    if isinstance(doc, dict):
        return {k: without_files(v) for k, v in doc.items() if k != "diagram_png"}
    return doc


def store(conn, model_id: int, cal: dict) -> None:
    for flag, c in cal.items():
        conn.execute(Q.upsert_calibration, {"model_id": model_id, "dataset": flag, "a": c["a"], "b": c["b"],
                                            "vote_a": c["vote_a"], "vote_b": c["vote_b"],
                                            "report": json.dumps(without_files(c))})


def load(conn, model_id: int) -> dict[str, Calibration]:
    return {c.dataset: c for c in rows(conn, Q.calibrations_of, {"model_id": model_id}, as_=Calibration)}


def vote(hits, cals: dict[str, Calibration], dataset: str | None,
         coverage: float = conformal.DEFAULT_COVERAGE) -> dict | None:
    """The label the neighbours vote for (those of the query's dataset, or all when the
    query has none), the calibrated probability that it is the query's label at this
    many neighbours, and whether the query is unlike anything on file (then no
    probability: a vote of strangers is not evidence). Top labels with equal votes are a
    tie: no label and no probability are claimed ("tie (2 of 4 each)"). Beside it, the
    diagnosis set at `coverage` (conformal.label_set), where one is fitted, and the
    sentence where the calibration's latest check on recent images fell short (recent.note)."""
    pool = [h for h in hits if dataset is None or h.dataset == dataset]
    if not pool:
        return None
    counts: dict[tuple, list] = {}
    for h in pool:
        counts.setdefault((h.dataset, h.label_name), []).append(h.distance)
    ranked = sorted(counts.items(), key=lambda kv: -len(kv[1]))  # stable: the nearer label first among equals
    (ds, label), near = ranked[0]
    tied = [lab for (_, lab), n in ranked if len(n) == len(near)]
    share = len(near) / len(pool)
    cal = cals.get(ds)
    # the threshold is ds's, so it is held against ds's nearest: a CT query with CTs of an
    # unlabelled archive on file at distance 0 still has nothing like it in breastmnist,
    # and a breastmnist vote for it is a vote of strangers
    nearest = min(h.distance for h in hits if h.dataset == ds)
    unlike = bool(cal and cal.ood_d1 is not None and nearest > cal.ood_d1)
    tie = len(tied) > 1
    confidence, at_k = (None, None) if cal is None or unlike or tie else cal.vote_confidence(
        share, float(np.mean(near)), len(pool))
    if tie:
        why = f"a tie ({len(near)} of {len(pool)} each: {conformal.SEP.join(map(str, tied))}): no single label is claimed"
    elif cal is None:
        why = f"no calibration for {ds} (`medsim evaluate` fits one; it needs labels and a validation split)"
    elif unlike:
        why = (f"unlike anything on file: the nearest {ds} neighbour is farther ({nearest:.3f}) "
               f"than 99% of {ds}'s validation and training images' nearest ({cal.ood_d1:.3f})")
    elif confidence is None:
        why = f"the calibration for {ds} was fitted at k = {K_FIT} only: run `medsim evaluate` again"
    else:
        why = None
    return {"dataset": ds, "label_name": None if tie else label, "tie": tied if tie else None,
            "votes": len(near), "of": len(pool), "share": share,
            "confidence": confidence, "calibrated_at_k": at_k, "unlike_anything_on_file": unlike,
            "no_confidence_because": why, "diagnosis_set": diagnosis_set(pool, cal, ds, unlike, coverage),
            "calibration_note": recent.note(cal.recent_check, ds) if cal else None}


def diagnosis_set(pool, cal: Calibration | None, ds: str, unlike: bool, coverage: float) -> dict | None:
    """The conformal set of ds's labels at `coverage` from the pool's ds neighbours; None
    where none is fitted or the query is unlike anything on file (its neighbours are not
    what the calibration queries had)."""
    if cal is None or not cal.conformal or unlike:
        return None
    voters = [(h.label_name, h.distance) for h in pool if h.dataset == ds]
    return conformal.label_set(cal.conformal, voters, coverage)
