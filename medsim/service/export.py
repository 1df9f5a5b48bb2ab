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
           "patient_key", "study_id", "thumbnail_url", "vote", "diagnosis_set")
ABOUT = """medsim search export

result.csv   one row per neighbour, nearest first: {columns}
             distance: Euclidean distance between embeddings (model {model}); p_same: the
             calibrated probability that it shares the query's diagnosis (empty where none
             is fitted, where same_label is False: a label known to differ, and for a
             query unlike anything on file); same_label: it has the query's label (empty: the query has none);
             patient_key: a keyed pseudonym, never the patient's identifier. A text cell
             that begins with = + - @, a tab or a CR carries a ' before it, so that a
             spreadsheet shows it rather than running it as a formula.
             vote and diagnosis_set are the query's, the same on every row: the vote
             ("tie (2 of 4 each: ...)" claims no label) and the labels that hold the
             query's at the stated coverage ("one of {{a, b}} at 90%").
result.json  the API's answer (POST /search), with the query, the vote and its notes.
thumbnails/  each neighbour's stored pixels as PNG, named rank-image_id.png; query.png
             is the query when it is a stored image or a kept upload.
"""


# OWASP's CSV-injection rule: a spreadsheet runs a cell that begins with one of these as a
# formula (=HYPERLINK(...) in an archive's label opens a link, or worse).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _cell(value):
    """A text cell that a spreadsheet would run gets a ' before it. Only text: numbers
    (ids, distances, p_same) keep their value, and a number cannot hold a formula."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return "" if value is None else value


def csv_text(res: SearchResponse) -> str:
    buf = io.StringIO()
    # every text cell quoted, numbers bare: an escaped cell cannot be ended early by a quote
    # or a separator inside it, and a spreadsheet still reads the numbers as numbers
    w = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_NONNUMERIC)
    w.writerow(COLUMNS)
    from medsim.search.present import set_text, vote_text

    about = {"vote": vote_text(res.vote.model_dump()) if res.vote else "",
             "diagnosis_set": set_text(res.diagnosis_set.model_dump()) if res.diagnosis_set else ""}
    for n in res.neighbours:
        row = {**n.model_dump(), **about}
        w.writerow([_cell(row[c]) for c in COLUMNS])
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
