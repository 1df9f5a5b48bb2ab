"""A search's result as a file to take away: CSV (one row per neighbour), JSON (the API's
own answer), or a ZIP holding both, the neighbours' thumbnails and the query's, and a
README saying what the columns mean. The page offers the same three."""

from __future__ import annotations

import csv
import io
import json
import zipfile

from medsim.service.schemas import SearchResponse

FORMATS = {"csv": "text/csv; charset=utf-8", "json": "application/json", "zip": "application/zip"}
COLUMNS = ("rank", "image_id", "dataset", "split", "label_name", "distance", "p_same", "same_label",
           "patient_key", "study_id", "thumbnail_url")
ABOUT = """medsim search export

result.csv   one row per neighbour, nearest first: {columns}
             distance: Euclidean distance between embeddings (model {model}); p_same: the
             calibrated probability that it shares the query's diagnosis (empty where none
             is fitted); same_label: it has the query's label (empty: the query has none);
             patient_key: a keyed pseudonym, never the patient's identifier.
result.json  the API's answer (POST /search), with the query, the vote and its notes.
thumbnails/  each neighbour's stored pixels as PNG, named rank-image_id.png; query.png
             is the query when it is a stored image or a kept upload.
"""


def csv_text(res: SearchResponse) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for n in res.neighbours:
        row = n.model_dump()
        w.writerow(["" if row[c] is None else row[c] for c in COLUMNS])
    return buf.getvalue()


def zip_bytes(res: SearchResponse, thumbnail, query_png=None) -> bytes:
    """thumbnail(image_id) -> PNG bytes (the service's renderer, as the owner); query_png()
    -> the query's PNG where it is not a stored image (a kept upload)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("README.txt", ABOUT.format(columns=", ".join(COLUMNS), model=res.model.id))
        z.writestr("result.csv", csv_text(res))
        z.writestr("result.json", json.dumps(res.model_dump(), indent=2))
        if res.query.kind == "image_id" and res.query.image_id is not None:
            z.writestr("thumbnails/query.png", thumbnail(res.query.image_id))
        elif query_png is not None:
            z.writestr("thumbnails/query.png", query_png())
        for n in res.neighbours:
            z.writestr(f"thumbnails/{n.rank:03d}-{n.image_id}.png", thumbnail(n.image_id))
    return buf.getvalue()
