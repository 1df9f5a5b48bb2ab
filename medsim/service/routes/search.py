"""POST /search (a stored image or a vector, JSON) and POST /search/upload (an image file,
multipart): both build a pipeline Request and run the one search pipeline."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Form
from fastapi.concurrency import run_in_threadpool

from medsim.errors import BadArgument
from medsim.search import pipeline
from medsim.search.request import ById, ByUpload, ByVector, Filters, Request
from medsim.service.deps import ServiceDep
from medsim.service.schemas import (
    ERRORS,
    SearchOptions,
    SearchRequest,
    SearchResponse,
    SearchUpload,
)

router = APIRouter(tags=["search"], responses=ERRORS)


def _request(query, opts: SearchOptions, filters: dict | None) -> Request:
    return Request(query, k=opts.k, engine=opts.engine, model=opts.model, max_distance=opts.max_distance,
                   filters=Filters(dict(filters or {}), opts.include_own_patient, opts.per_patient))


def _run(svc, req: Request) -> pipeline.Result:
    with svc.context() as ctx:
        return pipeline.run(ctx, req)


@router.post("/search", response_model=SearchResponse)
async def search(body: SearchRequest, svc: ServiceDep) -> SearchResponse:
    """Search the gallery (train + val) for the k images nearest a stored image (`image_id`)
    or a raw embedding (`vector`)."""
    t0 = time.perf_counter()
    given = [name for name in ("image_id", "vector") if getattr(body, name) is not None]
    if len(given) != 1:
        raise BadArgument("give exactly one query: an image_id or a vector (an image file goes to "
                          "POST /search/upload)" + (f"; got {' and '.join(given)}" if given else ""))
    query = ById(body.image_id) if body.image_id is not None else ByVector(tuple(body.vector))
    result = await run_in_threadpool(_run, svc, _request(query, body, body.filters))
    return SearchResponse.of(result, (time.perf_counter() - t0) * 1000)


@router.post("/search/upload", response_model=SearchResponse)
async def search_upload(form: Annotated[SearchUpload, Form(media_type="multipart/form-data")],
                        svc: ServiceDep) -> SearchResponse:
    """Search the gallery (train + val) for the k images nearest an uploaded image, decoded,
    windowed and resized exactly as stored images are. The same image on file is
    recognised by its pixels and left out of its own neighbours."""
    t0 = time.perf_counter()
    try:
        data = await form.image.read()
    finally:
        await form.image.close()
    query = ByUpload(data, form.image.filename or "the upload", svc.cfg.max_image_pixels)
    result = await run_in_threadpool(_run, svc, _request(query, form, form.filters))
    return SearchResponse.of(result, (time.perf_counter() - t0) * 1000)
