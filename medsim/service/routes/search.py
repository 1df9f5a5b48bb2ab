"""POST /search (a stored image or a vector, JSON) and POST /search/upload (an image file,
multipart): both build a pipeline Request and run the one search pipeline."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Annotated

from fastapi import APIRouter, Form, Query
from fastapi import Request as HttpRequest
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from medsim import access
from medsim.errors import BadArgument, Forbidden
from medsim.images import to_display
from medsim.search import GALLERY_SPLITS, pipeline
from medsim.search.request import ById, ByPixels, ByUpload, ByVector, Filters, Request
from medsim.service import export, reads, uploads
from medsim.service.deps import Searcher, ServiceDep, client_address
from medsim.service.schemas import (
    ERRORS,
    SearchOptions,
    SearchRequest,
    SearchResponse,
    SearchUpload,
)

router = APIRouter(tags=["search"], responses=ERRORS)


def _request(query, opts: SearchOptions, filters: dict | None) -> Request:
    box = getattr(opts, "box", None)
    if isinstance(box, str):  # a form field: JSON text
        try:
            box = json.loads(box)
        except ValueError:
            raise BadArgument(f"box must be JSON like [0, 0, 14, 14], got {box!r}") from None
        if not isinstance(box, list):
            raise BadArgument(f"box must be JSON like [0, 0, 14, 14], got {box!r}")
    return Request(query, k=opts.k, engine=opts.engine, model=opts.model, max_distance=opts.max_distance,
                   filters=Filters(dict(filters or {}), opts.include_own_patient, opts.per_patient,
                                   opts.splits or GALLERY_SPLITS),
                   box=tuple(box) if box is not None else None, coverage=opts.coverage)


def _run(svc, who: access.Principal, req: Request, client: str | None, sha256: str | None = None,
         action: str = "search") -> pipeline.Result:
    """The pipeline as the principal, then its one access-log row (before the answer
    leaves): `search`, or `export` for a search whose answer leaves as a file. sha256: the
    uploaded bytes', for a query by upload (a new one or a kept one)."""
    with svc.context(who) as ctx:
        if ctx.restricted:
            _check_grants(ctx.conn, who, req.filters.where)
        result = pipeline.run(ctx, req)
    reads.attach_viewer_links(svc, who, result.hits)
    q = result.query
    svc.log(who, client, action, [h.image_id for h in result.hits], query_kind=q.kind, query_image_id=q.image_id,
            query_sha256=sha256, model_id=result.model.id, engine=result.engine)
    return result


def _check_grants(conn, who: access.Principal, where: dict) -> None:
    """403 for a user granted nothing, or for a dataset filter outside the grants (which
    row-level security would answer with an empty gallery, a less useful sentence). The
    rule itself is row-level security; this only words its answer."""
    if not who.granted:
        raise Forbidden(f"user {who.name} is granted no dataset (an administrator runs: medsim grant {who.name} "
                        f"DATASET)")
    asked = where.get("dataset")
    asked = [asked] if isinstance(asked, str) else list(asked or [])
    if not asked:
        return
    visible = set(access.visible_datasets(conn))
    outside = [d for d in asked if d not in visible]
    if outside:
        raise Forbidden(f"the filter names {len(outside)} dataset(s) user {who.name} is not granted (or that do not "
                        f"exist)")


@router.post("/search", response_model=SearchResponse)
async def search(body: SearchRequest, svc: ServiceDep, who: Searcher, http: HttpRequest) -> SearchResponse:
    """Search the gallery (every split by default) for the k images nearest a stored image (`image_id`)
    or a raw embedding (`vector`)."""
    return (await _search(body, svc, who, http, "search"))[0]


async def _search(body: SearchRequest, svc, who: access.Principal, http: HttpRequest,
                  action: str) -> tuple[SearchResponse, uploads.Kept | None]:
    """A JSON search, logged once as `action` -> its answer, and the kept upload it was by."""
    t0 = time.perf_counter()
    given = [name for name in ("image_id", "vector", "upload") if getattr(body, name) is not None]
    if len(given) != 1:
        raise BadArgument("give exactly one query: an image_id, a vector or an upload's handle (an image file "
                          "goes to POST /search/upload)" + (f"; got {' and '.join(given)}" if given else ""))
    kept = None
    if body.upload is not None:
        kept = await run_in_threadpool(uploads.load, svc, body.upload, who)
        query = ByPixels(kept.array(), "a kept upload")
    else:
        query = ById(body.image_id) if body.image_id is not None else ByVector(tuple(body.vector))
    result = await run_in_threadpool(_run, svc, who, _request(query, body, body.filters), client_address(http),
                                     kept.sha256 if kept else None, action)
    return SearchResponse.of(result, (time.perf_counter() - t0) * 1000, body.upload), kept


@router.post("/search/upload", response_model=SearchResponse)
async def search_upload(form: Annotated[SearchUpload, Form(media_type="multipart/form-data")],
                        svc: ServiceDep, who: Searcher, http: HttpRequest) -> SearchResponse:
    """Search the gallery (every split by default) for the k images nearest an uploaded image, decoded,
    windowed and resized exactly as stored images are. The same image on file is
    recognised by its pixels and left out of its own neighbours."""
    t0 = time.perf_counter()
    try:
        data = await form.image.read()
    finally:
        await form.image.close()
    query = ByUpload(data, form.image.filename or "the upload", svc.cfg.max_image_pixels)
    sha = hashlib.sha256(data).hexdigest()
    result = await run_in_threadpool(_run, svc, who, _request(query, form, form.filters), client_address(http), sha)
    handle = await run_in_threadpool(uploads.keep, svc, who.name, result.query.pixels, sha)
    return SearchResponse.of(result, (time.perf_counter() - t0) * 1000, handle)


@router.post("/search/export", response_class=Response,
             responses={200: {"content": {t: {} for t in export.FORMATS.values()},
                              "description": "the result as CSV, JSON or a ZIP with thumbnails"}})
async def search_export(body: SearchRequest, svc: ServiceDep, who: Searcher, http: HttpRequest,
                        format: Annotated[str, Query(pattern="^(csv|json|zip)$")] = "csv") -> Response:
    """The same search as `POST /search` (a stored image, a vector or a kept upload), as a
    file: `csv` (a row per neighbour), `json` (the search's answer), or `zip` (both, the
    thumbnails and a README)."""
    res, kept = await _search(body, svc, who, http, "export")  # one log row: the export, with what it holds
    if format == "csv":
        content = export.csv_text(res).encode()
    elif format == "json":
        content = res.model_dump_json(indent=2).encode()
    else:
        query_png = (lambda: reads.render(to_display(kept.array()), 256)) if kept is not None else None
        content = await run_in_threadpool(export.zip_bytes, res, lambda i: reads.thumbnail(svc, i, 256), query_png)
    name = f"medsim-search-{res.query.image_id or res.query.kind}.{format}"
    return Response(content, media_type=export.FORMATS[format],
                    headers={"Content-Disposition": f'attachment; filename="{name}"'})
