"""Search results for people: a table for the terminal, JSON, and the montage figure.
(The HTTP shapes are the service's: medsim.service.schemas.)"""

from __future__ import annotations

from pathlib import Path

from medsim.images import StoredRow, to_display
from medsim.queries import Q, rows


def as_json(results) -> list[dict]:
    out = []
    for r in results:
        q = r.query
        out.append({"query": {"kind": q.kind, "label": q.label, "image_id": q.image_id, "dataset": q.dataset,
                              "label_name": q.label_name, "label_names": q.label_names,
                              "in_gallery": q.in_gallery},
                    "model_id": r.model.id, "engine": r.engine, "index_build": r.index_build,
                    "vote": q.vote, "notes": r.notes, "neighbours": [dict(vars(h)) for h in r.hits]})
    return out


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
            p = f"  P(same) {h.p_same:.2f}" if h.p_same is not None else ""
            lines.append(f"  {rank:2d}. image {h.image_id:<7d} {h.dataset:16s} {h.split:5s} "
                         f"{h.label_name[:40]:40s} distance {h.distance:.4f}{p}")
        if q.vote:
            v = q.vote
            conf = f"; calibrated P(right) {v['confidence']:.2f}" if v["confidence"] is not None else ""
            # a stored query's label is known: say whether the vote got it, so an example
            # (the demo's montage) is not a showcase picked for being right
            verdict = ("" if not q.label_name or v["dataset"] != q.dataset else
                       "  -> right" if v["label_name"] == q.label_name else f"  -> wrong (it is {q.label_name})")
            lines.append(f"  vote: {v['label_name']} ({v['votes']} of {v['of']} {v['dataset']} neighbours{conf})"
                         f"{verdict}")
            if v.get("no_confidence_because"):
                lines.append(f"  no P(right): {v['no_confidence_because']}")
    return "\n".join(lines)


def montage(conn, results, out: Path | str) -> Path:
    """The notebook's figure: one row per query, the query then its neighbours, each as
    stored (8-bit for display by the same bit-depth rule as the model's input)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = max((len(r.hits) for r in results), default=0)
    fig, axes = plt.subplots(len(results), k + 1, figsize=(2 * (k + 1), 2.2 * len(results)), dpi=100,
                             squeeze=False)
    for row, r in enumerate(results):
        q = r.query
        ids = [h.image_id for h in r.hits] + ([q.image_id] if q.pixels is None and q.image_id else [])
        pix = {p.id: p.display_or_refuse() for p in rows(conn, Q.image_pixels, {"ids": ids}, as_=StoredRow)}
        query_pixels = to_display(q.pixels) if q.pixels is not None else pix.get(q.image_id)
        panels = [(query_pixels, f"QUERY {q.label}\n{q.dataset or ''} {q.label_name or ''}".strip())]
        panels += [(pix[h.image_id], f"{h.dataset}\n{h.label_name[:22]} d={h.distance:.3f}") for h in r.hits]
        for c in range(k + 1):
            ax = axes[row, c]
            ax.axis("off")
            if c < len(panels) and panels[c][0] is not None:
                ax.imshow(panels[c][0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
                ax.set_title(panels[c][1], fontsize=7)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out

