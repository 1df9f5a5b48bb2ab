"""Search results for people: a table for the terminal, JSON, and the montage figure.
(The HTTP shapes are the service's: medsim.service.schemas.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medsim.images import StoredRow, to_display
from medsim.queries import Q, rows
from medsim.training.conformal import SEP


def as_json(results) -> list[dict]:
    out = []
    for r in results:
        q = r.query
        out.append({"query": {"kind": q.kind, "label": q.label, "image_id": q.image_id, "dataset": q.dataset,
                              "label_name": q.label_name, "label_names": q.label_names,
                              "in_gallery": q.in_gallery},
                    "model_id": r.model.id, "engine": r.engine, "index_build": r.index_build,
                    "vote": q.vote, "diagnosis_set": q.diagnosis_set, "calibration_note": q.calibration_note,
                    "notes": r.notes, "neighbours": [dict(vars(h)) for h in r.hits]})
    return out


def vote_text(v: dict | None) -> str:
    """The vote as a person reads it: "malignant (3 of 4; calibrated P(right) 0.81)", or a
    tie, which claims no label: "tie (2 of 4 each: benign, malignant)"."""
    if not v:
        return ""
    if v.get("tie"):
        return f"tie ({v['votes']} of {v['of']} each: {SEP.join(map(str, v['tie']))})"
    conf = f"; calibrated P(right) {v['confidence']:.2f}" if v["confidence"] is not None else ""
    return f"{v['label_name']} ({v['votes']} of {v['of']} neighbours{conf})"


def set_text(ds: dict | None) -> str:
    from medsim.training.conformal import described

    return described(ds)


def neighbour_text(h) -> str:
    """P(same), or why there is none: a label known to differ is said as such."""
    if h.same_label is False:
        return "  different label"
    return f"  P(same) {h.p_same:.2f}" if h.p_same is not None else ""


def table(results) -> str:
    lines = []
    for r in results:
        q = r.query
        about = f" ({q.dataset}: {q.label_name})" if q.dataset else ""
        lines.append(f"query {q.label}{about}")
        if q.in_gallery:
            lines.append(f"  note: the query is itself in the gallery (image id "
                         f"{', '.join(map(str, q.in_gallery))}); left out of its neighbours")
        lines += [f"  note: {n}" for n in r.notes if "itself in the gallery" not in n]
        for rank, h in enumerate(r.hits, 1):
            p = neighbour_text(h)
            lines.append(f"  {rank:2d}. image {h.image_id:<7d} {h.dataset:16s} {h.split:5s} "
                         f"{h.label_name[:40]:40s} distance {h.distance:.4f}{p}")
            if h.viewer_url:
                lines.append(f"      in the PACS: {h.viewer_url}")
        if q.vote:
            v = q.vote
            # a stored query's label is known: say whether the vote got it, so an example
            # (the demo's montage) is not a showcase picked for being right
            verdict = ("" if not q.label_name or v["dataset"] != q.dataset or v.get("tie") else
                       "  -> right" if v["label_name"] == q.label_name else f"  -> wrong (it is {q.label_name})")
            lines.append(f"  vote: {v['dataset']}: {vote_text(v)}{verdict}")
            if v.get("no_confidence_because") and not v.get("tie"):
                lines.append(f"  no P(right): {v['no_confidence_because']}")
        if q.diagnosis_set:
            held = ("" if not q.label_name or q.vote["dataset"] != q.dataset else
                    "  -> holds it" if q.label_name in q.diagnosis_set["labels"] else "  -> misses it")
            lines.append(f"  diagnosis set: {set_text(q.diagnosis_set)}{held}")
        if q.calibration_note:  # under the numbers it qualifies: the set and P(right) were fitted elsewhere
            lines.append(f"  calibration: {q.calibration_note}")
    return "\n".join(lines)


def montage(conn, results, out: Path | str, explain_net=None) -> Path:
    """The notebook's figure: one row per query, the query then its neighbours, each as
    stored (8-bit for display by the same bit-depth rule as the model's input). With
    explain_net (the torch network), each neighbour carries its similarity map against the
    query in red, and the query its map against the nearest (medsim.model.explain)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = max((len(r.hits) for r in results), default=0)
    fig, axes = plt.subplots(len(results), k + 1, figsize=(2 * (k + 1), 2.8 * len(results)), dpi=100,
                             squeeze=False)
    for row, r in enumerate(results):
        q = r.query
        ids = [h.image_id for h in r.hits] + ([q.image_id] if q.pixels is None and q.image_id else [])
        stored = {p.id: p for p in rows(conn, Q.image_pixels, {"ids": ids}, as_=StoredRow)}
        pix = {i: p.display_or_refuse() for i, p in stored.items()}
        query_pixels = to_display(q.pixels) if q.pixels is not None else pix.get(q.image_id)
        maps = _maps(explain_net, q, r.hits, stored) if explain_net is not None else {}
        said = _panel_text(q)
        panels = [(query_pixels, f"QUERY {q.label}\n{q.dataset or ''} {q.label_name or ''}".strip()
                   + (f"\n{said}" if said else ""))]
        panels += [(pix[h.image_id], f"{h.dataset}\n{h.label_name[:22]} d={h.distance:.3f}") for h in r.hits]
        for c in range(k + 1):
            ax = axes[row, c]
            ax.axis("off")
            if c < len(panels) and panels[c][0] is not None:
                m = maps.get(c)
                shown = panels[c][0]
                if m is not None and shown.ndim == 3:  # grey under the red map, as the page draws it
                    shown = shown.mean(-1)
                ax.imshow(shown, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
                if m is not None:  # stretched over the image whatever its size
                    h, w = panels[c][0].shape[:2]
                    ax.imshow(np.ma.masked_less(m, 0.05), cmap="Reds", alpha=0.55, vmin=0, vmax=1,
                              extent=(-0.5, w - 0.5, h - 0.5, -0.5), interpolation="bilinear")
                ax.set_title(panels[c][1] + ("\nmap vs #1" if c == 0 and m is not None else ""), fontsize=7)
    if explain_net is not None:
        fig.suptitle("red: where each pair's closeness lies (integrated gradients of the distance, from the blurred "
                     "image); what the model compares, not a diagnosis' reason", fontsize=7)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def _panel_text(q) -> str:
    """The vote and the set under the query's panel, wrapped to its width (a panel is two
    inches: a five-grade "cannot tell" set spelled out ran over three neighbours)."""
    import textwrap

    ds = q.diagnosis_set
    if ds and len(ds["labels"]) > 1 and len(ds["labels"]) == len(ds.get("of") or ()):
        set_line = f"set: cannot tell at {ds['coverage']:.0%} (any of {len(ds['labels'])})"
    else:
        set_line = "set: " + set_text(ds) if ds else ""
    lines = ["vote: " + vote_text(q.vote) if q.vote else "", set_line]
    return "\n".join(textwrap.fill(x, 34) for x in lines if x)


def _maps(net, q, hits, stored) -> dict:
    """Panel index -> its map in [0, 1]: the query's against the nearest, each neighbour's
    against the query."""
    from medsim.images import model_input
    from medsim.model import explain

    s = net.cfg.image_size
    if q.pixels is not None:
        qx = model_input(q.pixels, s)
    elif q.image_id in stored:
        qx = stored[q.image_id].model_input_or_refuse(s)
    else:
        return {}
    out = {}
    for c, h in enumerate(hits, 1):
        ma, mb = explain.pair_maps(net, qx, stored[h.image_id].model_input_or_refuse(s))
        out[c] = explain.display(mb)
        if c == 1:
            out[0] = explain.display(ma)
    return out
