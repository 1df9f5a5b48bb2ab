"""One search pipeline for every door (CLI, HTTP, the demo): a Request and a Context go in,
a Result comes out, and only the presenters differ.

    run(): the model -> the query (a stored image's vector, or an image embedded the way
    training inputs were) -> the engine -> why nothing came back (only then)
    -> max_distance -> calibration (P(same), the vote) -> notes (among them what the
    filtered gallery holds that the model has not embedded yet: a search cannot see it)

Cost follows need: a stored image that is already embedded is searched with its stored
vector, so search by id through pgvector imports neither torch nor FAISS, and no step
reads the whole gallery (the count that says "the gallery is empty" runs only when a
search found nothing; what is not embedded yet is counted from the embedding queue and
the images past the model's newest, at the cost of what is missing). A query that is
itself on file (the same id, the same pixels, or the same picture at another size: a
perceptual hash near its own, confirmed by the pixels) takes that image's identity: its
dataset, label and patient, and it is left out of its own neighbours.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from psycopg.types.json import Jsonb

from medsim import images, queue
from medsim.errors import BadArgument, NotFound
from medsim.queries import Q, one, rows, scalar
from medsim.search import engines
from medsim.search.engines import Hit
from medsim.search.request import ByFile, ById, ByPixels, ByUpload, ByVector, Filters, Request

__all__ = ["Hit", "Query", "Request", "Result", "run", "Filters"]


@dataclass
class Query:
    kind: str  # image_id, file, upload or vector
    label: str  # how to show it: "image 123" or the file name
    vector: np.ndarray  # (dim,) float32
    image_id: int | None = None  # the stored image it is (by id, or by its pixels)
    dataset: str | None = None
    label_name: str | None = None
    label_names: list = field(default_factory=list)
    in_gallery: list = field(default_factory=list)  # gallery ids holding this very image
    on_file: list = field(default_factory=list)  # (id, split) of every stored copy of it, whatever the gallery
    patient_key: str | None = None  # the query's patient, excluded from its neighbours by default
    pixels: np.ndarray | None = None  # stored-form pixels of a file or upload (a montage shows them)
    resized: str | None = None  # how a file or upload was recognised as a stored image at another size
    vote: dict | None = None  # the neighbours' label vote and its calibrated confidence
    diagnosis_set: dict | None = None  # the labels that hold the query's at a stated coverage (conformal)
    calibration_note: str | None = None  # "not verified on recent images: ..." (training.recent.note)


@dataclass
class Result:
    model: object  # registry.ModelRow
    engine: str
    query: Query
    hits: list
    index_build: int | None = None  # the FAISS build that answered
    notes: list = field(default_factory=list)


@dataclass
class _Stored:
    id: int
    dataset: str
    split: str
    label_name: str
    label_names: list
    patient_key: str | None
    embedding: object  # pgvector Vector, or None when not embedded for this model


def run(ctx, req: Request) -> Result:
    with ctx.stage("fetch"):
        model = ctx.model(req.model)
    q = resolve(ctx, model, req.query, req.box)
    q.in_gallery = [i for i, split in q.on_file if split in req.filters.splits]  # this search's gallery
    build = None
    with ctx.stage("search"):
        if req.engine == "faiss":
            hits, build = engines.faiss(ctx, model.id, q, req.k, req.filters)
        else:
            hits = engines.pgvector(ctx, model.id, q, req.k, req.filters, exact=req.engine == "exact")
    out = Result(model, req.engine, q, hits, build)
    missing = not_embedded(ctx, model.id, req.filters)
    if not hits:
        out.notes.append(nothing_found(ctx.conn, model.id, req.filters.where, missing))
    else:  # what the answer could not hold: images of the filtered gallery not embedded yet
        out.notes.extend("not searched: " + _sentence(model.id, m) for m in missing)
    if req.max_distance is not None:
        out.hits = [h for h in hits if h.distance <= req.max_distance]
        out.notes.append(f"{len(hits) - len(out.hits)} of {len(hits)} neighbours were farther than max_distance "
                         f"{req.max_distance}")
    calibrate(ctx.calibrations(model.id), q, out.hits, req.coverage)
    if q.in_gallery and q.resized:
        also = [i for i in q.in_gallery if i != q.image_id]  # near duplicates on file: the same picture, by the rule
        out.notes.append(f"the query is image {q.image_id} at another size ({q.resized}); left out of its "
                         f"neighbours" + (f", with {', '.join(map(str, also))} (the same picture by the leakage "
                                          f"audit's pixel rule)" if also else ""))
    elif q.in_gallery and q.kind != "image_id":
        out.notes.append(f"the {'uploaded image' if q.kind == 'upload' else 'query file'} is itself in the "
                         f"gallery (image id {', '.join(map(str, q.in_gallery))}); left out of its neighbours")
    return out


def crop(x: np.ndarray, box: tuple | None) -> np.ndarray:
    """The box [x0, y0, x1, y1) of stored-form pixels; BadArgument when it leaves the image."""
    if box is None:
        return x
    x0, y0, x1, y1 = box
    h, w = x.shape[:2]
    if x1 > w or y1 > h:
        raise BadArgument(f"the box {list(box)} reaches outside the image ({w} x {h} pixels)")
    return x[y0:y1, x0:x1]


def resolve(ctx, model, spec, box: tuple | None = None) -> Query:
    """A request's query -> the vector to search with, and what is known of the image (a
    box: only that region of it is embedded)."""
    if isinstance(spec, ByVector):
        v = np.asarray(spec.values, dtype=np.float32)
        if v.ndim != 1 or len(v) != model.embedding_dim:
            raise BadArgument(f"the vector has {v.size} values; model {model.id} embeds into "
                              f"{model.embedding_dim} dimensions")
        if not np.isfinite(v).all():
            raise BadArgument("the vector holds NaN or infinite values")
        return Query("vector", "a vector", v)
    if isinstance(spec, ById):
        return _stored_query(ctx, model, spec.image_id, box)
    with ctx.stage("decode"):
        if isinstance(spec, ByFile):
            x = images.read(spec.path, name=Path(spec.path).name)
            label = Path(spec.path).name
        elif isinstance(spec, ByUpload):
            if not spec.data:
                raise BadArgument(f"{spec.name} is empty")
            x = images.read(spec.data, name=spec.name, max_pixels=spec.max_pixels)
            label = spec.name
        elif isinstance(spec, ByPixels):
            x, label = images.as_stored(spec.pixels), spec.name
        else:
            raise BadArgument(f"not a query: {spec!r}")
        size = int(model.config.get("image_size", 28))
        region = crop(x, box)
        model_x = images.model_input(region, size)
    with ctx.stage("embed"):
        v = ctx.embed(model, model_x)
    q = Query(spec.kind, label if box is None else f"{label}, region {list(box)}", v.astype(np.float32), pixels=x)
    if box is not None:  # a region is not on file: no identity to take from identical pixels
        return q
    # the same pixels on file (as an ingest would store them): that image's identity
    digest = hashlib.sha256(images.stored.to_bytes(x)).digest()  # as an ingest would store it
    same = rows(ctx.conn, Q.images_by_sha256, {"sha256": digest}, as_=_Stored)
    if not same:  # the same picture at another size (or re-encoded): its hash, then its pixels
        with ctx.stage("fetch"):
            same = resized_copies(ctx, x)
        q.resized = same[0].how if same else None
        stored = scalar(ctx.conn, Q.image_embedding, {"id": same[0].id, "model_id": model.id}) if same else None
        if stored is not None:  # the picture at its stored size: the same neighbours as a search by its id
            q.vector = stored.to_numpy().astype(np.float32)
            q.resized += ", searched with its stored embedding"
    if same:
        _take_identity(q, same[0])
        q.on_file = [(s.id, s.split) for s in same]
    return q


@dataclass
class _Near(_Stored):
    bits: int = 0  # Hamming distance between the query's perceptual hash and this image's
    how: str = ""  # what identifies it: sizes, bits apart, correlation


MAX_BITS = 6  # resized copies of BreastMNIST images: 0-4 bits from their original; two different ones 20+
MAX_BITS_THUMBNAIL = 18  # a copy under the hash's 32 px: a 0.5x nearest-neighbour one is 2-18 bits off
CANDIDATES = 8


def resized_copies(ctx, x: np.ndarray) -> list:
    """The stored images this one is a copy of at another size -> [_Near], the best first.

    Candidates: stored perceptual hashes within MAX_BITS of the query's (images/perceptual.py;
    four index lookups on the hash's 16-bit bands, the bit counts on the rows they find, at
    most `scan` of them, whatever the gallery's size). A query smaller than the hash's
    32 px (a thumbnail: its hash moves further, and more often past a band) is compared with
    every stored hash instead, up to MAX_BITS_THUMBNAIL bits: one pass over a bigint column,
    taken only for such queries.
    Each candidate is confirmed by the leakage audit's pixel rule (audit.aligned_correlation
    at audit.MIN_CORRELATION), both images at a common size: half the smaller one's shorter
    side (7 to 32 px), where a resampling filter's traces are gone (a 0.5x bilinear copy:
    r 0.990 at 14 px, 0.9975 at 7), or, for a copy smaller than the stored image, its own
    size with the stored image shrunk by each usual filter (perceptual.renderings).
    """
    from medsim.audit import MIN_CORRELATION, aligned_correlation
    from medsim.images import perceptual

    h = perceptual.phash(x)
    args = {"phash": h, "max_bits": MAX_BITS, "scan": 5000, "k": CANDIDATES,
            **{f"b{n}": (h >> s) & 0xFFFF for n, s in enumerate((48, 32, 16, 0))}}
    if min(x.shape[:2]) < perceptual.HASH_SIZE:
        near = rows(ctx.conn, Q.images_near_phash, {**args, "max_bits": MAX_BITS_THUMBNAIL}, as_=_Near)
    else:
        near = rows(ctx.conn, Q.images_by_phash, args, as_=_Near)
    found = []
    for c in near:
        try:
            y = ctx.stored(c.id).array()
        except ValueError:  # stored broken: nothing to compare with
            continue
        side = max(7, min(32, min(*x.shape[:2], *y.shape[:2]) // 2))
        pairs = [(side, perceptual.grey(x, side), [perceptual.grey(y, side)])]
        q_side = min(x.shape[:2])
        if q_side < min(y.shape[:2]):
            pairs.append((q_side, perceptual.grey(x, q_side), perceptual.renderings(y, q_side)))
        best = (-1.0, side)
        for at, a, bs in pairs:
            r = aligned_correlation(np.repeat(a[None], len(bs), 0), np.stack(bs))
            best = max(best, (float(r.max()), at))
        if best[0] >= MIN_CORRELATION:
            c.how = (f"{x.shape[1]} x {x.shape[0]} px against {y.shape[1]} x {y.shape[0]} stored: perceptual hashes "
                     f"{c.bits} bits apart, pixels correlating at {best[0]:.4f} at {best[1]} px")
            found.append((-best[0], c.id, c))
    return [c for _, _, c in sorted(found, key=lambda t: t[:2])]


def _stored_query(ctx, model, image_id: int, box: tuple | None = None) -> Query:
    with ctx.stage("fetch"):
        r = one(ctx.conn, Q.query_image, {"id": image_id, "model_id": model.id}, as_=_Stored)
    if r is None:
        raise NotFound(f"no image with id {image_id}")
    if box is not None:  # a region of it: its pixels, cut and embedded
        with ctx.stage("fetch"):
            p = ctx.stored(image_id)
        x = images.model_input(crop(p.array(), box), int(model.config.get("image_size", 28)))
        with ctx.stage("embed"):
            v = ctx.embed(model, x).astype(np.float32)
        q = Query("image_id", f"image {image_id}, region {list(box)}", v)
        _take_identity(q, r)  # the same patient's images stay out, as for the whole image
        q.on_file = [(image_id, r.split)]
        return q
    if r.embedding is not None:
        v = r.embedding.to_numpy().astype(np.float32)
    else:  # not embedded yet for this model: its pixels
        with ctx.stage("fetch"):
            p = ctx.stored(image_id)
        x = p.model_input_or_refuse(int(model.config.get("image_size", 28)))
        with ctx.stage("embed"):
            v = ctx.embed(model, x).astype(np.float32)
    q = Query("image_id", f"image {image_id}", v)
    _take_identity(q, r)
    q.on_file = [(image_id, r.split)]
    return q


def _take_identity(q: Query, r: _Stored) -> None:
    q.image_id, q.dataset, q.label_name, q.label_names, q.patient_key = (
        r.id, r.dataset, r.label_name, list(r.label_names or []), r.patient_key)


FILTER_KEYS = ("dataset", "split", "label", "modality")  # besides any metadata key on file


def _values(v) -> list:
    return [v] if isinstance(v, str) else list(v or [])


def not_embedded(ctx, model_id: int, filters: Filters) -> list:
    """The datasets of the filtered gallery (its splits, the filter's datasets) holding
    images the model has not embedded yet: what a search cannot see. Cheap where nothing
    is missing (queue.not_embedded); the service keeps the answer a few seconds."""
    splits = filters.splits
    if "split" in filters.where:
        splits = tuple(s for s in splits if s in _values(filters.where["split"]))
    found = ctx.not_embedded(model_id, splits) if splits else []
    if "dataset" in filters.where:
        found = [m for m in found if m.dataset in _values(filters.where["dataset"])]
    return found


def _sentence(model_id: int, m) -> str:
    return queue.not_embedded_sentence(model_id, m.dataset, m.missing, m.total, m.failed)


def nothing_found(conn, model_id: int, where: dict, missing: list = ()) -> str:
    """Why a search found nothing -> the sentence to show with the empty result; NotFound
    (what to do) when the model's gallery is empty, BadArgument for a filter key that no
    image has. `missing`: not_embedded's datasets, said instead of "no image matches" (an
    archive still being embedded is not empty). Counts over the gallery: run only when a
    search found nothing."""
    gone = "; ".join(_sentence(model_id, m) for m in missing)
    if scalar(conn, Q.gallery_count, {"model_id": model_id, "filter": Jsonb({})}) == 0:
        raise NotFound(f"the gallery is empty for model {model_id}: "
                       + (gone or "ingest images and run the embedding worker first"))
    known = [*FILTER_KEYS, *(r[0] for r in conn.execute(Q.gallery_metadata_keys, {"model_id": model_id}))]
    unknown = sorted(set(where) - set(known))
    if unknown and not gone:
        raise BadArgument(f"unknown filter key {', '.join(map(repr, unknown))}; the keys on file are "
                          f"{', '.join(dict.fromkeys(known))}")
    if unknown:  # the key may be on the images not embedded yet
        return f"no embedded image has the filter key {', '.join(map(repr, unknown))} yet; {gone}"
    if gone and set(where) <= {"dataset"} and all(m.missing == m.total for m in missing):
        return gone  # nothing of what was asked for is embedded: that is the whole answer
    if gone:
        return (f"no embedded image matches the filter {_described(where)}; " if where
                else "nothing embedded besides the query and its own patient's images; ") + gone
    if not where:  # the query itself and its own patient's images are left out
        return "nothing on file besides the query and its own patient's images"
    return "no image on file matches the filter " + _described(where)


def _described(where: dict) -> str:
    return ", ".join(f"{k}={v if isinstance(v, str) else '|'.join(v)}" for k, v in where.items())


def calibrate(cals: dict, q: Query, hits: list, coverage: float | None = None) -> None:
    """Each neighbour's calibrated P(same diagnosis), whether it shares the query's label,
    the query's vote and its diagnosis set at `coverage` (the model's medsim.calibrations
    rows; none fitted, no numbers). No P(same) beside a label known to differ from the
    query's (a probability of sameness next to a known difference reads as a contradiction)
    nor for a query unlike anything on file (its distances are outside what was fitted)."""
    from medsim.training import calibration, conformal

    wanted = set(q.label_names)
    for h in hits:
        c = cals.get(h.dataset)
        h.p_same = c.p_same(h.distance) if c else None
        if wanted:
            h.same_label = h.dataset == q.dataset and bool(wanted & set(h.label_names or []))
            if not h.same_label:
                h.p_same = None
    q.vote = calibration.vote(hits, cals, q.dataset, coverage or conformal.DEFAULT_COVERAGE) if cals else None
    q.diagnosis_set = q.vote.pop("diagnosis_set", None) if q.vote else None
    q.calibration_note = q.vote.pop("calibration_note", None) if q.vote else None
    if q.vote and q.vote["unlike_anything_on_file"]:
        for h in hits:
            h.p_same = None


def example_queries(conn, flags) -> list[int]:
    """The first test image of each of these datasets (the demo's montage): a stated rule."""
    return [r[0] for r in conn.execute(Q.first_test_image_per_dataset, {"flags": list(flags)})]
