"""The HTTP API and the web page: FastAPI over `medsim.service.core.Service`.

FastAPI + uvicorn: the standard ASGI stack, with the OpenAPI schema (`/docs`) generated
from the same pydantic models that validate requests. Handlers that touch the database
or the network are plain `def`s, run in Starlette's thread pool; psycopg and torch
release the GIL while they wait or compute.

Errors: a `MedsimError` becomes its `http_status` with `{"error": class, "detail":
sentence}`; a request that fails validation is a 400 of the same shape naming the field
(like every BadArgument); anything else is a 500 whose traceback goes to the log under a
request id, and the client gets only that id.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from importlib import resources
from typing import Annotated, Literal

from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medsim.errors import BadArgument, DatabaseUnavailable, MedsimError, NotFound, TooLarge
from medsim.search import ENGINES, MAX_K
from medsim.service.core import ServeConfig, Service, hit_rows

log = logging.getLogger("medsim.serve")

STATIC = resources.files("medsim.service") / "static"
THUMBNAIL_MAX = 512


# ------------------------------------------------------------------ request and response shapes
class SearchRequest(BaseModel):
    """The query (exactly one of `image_id`, `vector`, or an uploaded `image` in a
    multipart request) and how to search. Unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")

    image_id: int | None = Field(None, description="a stored image to search from")
    vector: list[float] | None = Field(None, description="a raw embedding of the model's dimension")
    k: int = Field(4, ge=1, le=MAX_K, description="neighbours to return")
    engine: Literal[ENGINES] = Field("pgvector", description="pgvector (HNSW), exact (pgvector, no index) "
                                                             "or faiss (the model's latest FAISS build)")
    filters: dict[str, str | list[str]] = Field(
        default_factory=dict, description='only neighbours matching: {"dataset": ..., "label": [...], '
                                          '"split": "train"|"val", "modality": ..., any metadata key}')
    include_own_patient: bool = Field(False, description="also return other images of the query's patient")
    per_patient: int | None = Field(None, ge=1, description="at most this many neighbours per patient")
    max_distance: float | None = Field(None, ge=0, description="drop neighbours farther than this")
    model: int | None = Field(None, description="a model id (default: the current model)")


class Neighbour(BaseModel):
    rank: int
    image_id: int
    dataset: str
    split: str
    label_name: str
    distance: float
    p_same: float | None = Field(description="calibrated probability that it shares the query's diagnosis "
                                             "(fitted by `medsim evaluate` on validation pairs; None if not fitted)")
    same_label: bool | None = Field(description="the query's label and dataset (None: the query has no label)")
    patient_key: str | None
    study_id: str | None
    thumbnail_url: str


class QueryInfo(BaseModel):
    kind: Literal["image_id", "upload", "vector"]
    label: str
    image_id: int | None
    dataset: str | None
    label_name: str | None
    in_gallery: list[int]


class Vote(BaseModel):
    dataset: str
    label_name: str
    votes: int
    of: int
    share: float
    confidence: float | None = Field(description="calibrated probability that the vote is the query's label "
                                                 "(fitted at k=10 on validation queries)")
    calibrated_at_k: int


class ModelBrief(BaseModel):
    id: int
    name: str
    embedding_dim: int


class SearchResponse(BaseModel):
    model: ModelBrief
    engine: str
    index_build: int | None = Field(description="the FAISS build that answered (engine faiss)")
    query: QueryInfo
    vote: Vote | None = Field(None, description="the label the neighbours vote for")
    neighbours: list[Neighbour]
    notes: list[str]
    timing_ms: float


class ErrorBody(BaseModel):
    error: str
    detail: str


ERRORS = {s: {"model": ErrorBody} for s in (400, 404, 409, 413, 422, 503)}


def error_response(err: MedsimError, **headers) -> JSONResponse:
    """The one shape every refusal has: {"error": class, "detail": sentence}."""
    return JSONResponse({"error": type(err).__name__, "detail": str(err)}, status_code=err.http_status,
                        headers=headers or None)


# ------------------------------------------------------------------ the body limit
class BodyLimit:
    """Refuses a request body over the limit before it is read: by Content-Length when
    the client sends one, else while it streams in (chunked uploads)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            response = error_response(TooLarge(self.message(int(declared))), connection="close")
            return await response(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise TooLarge(self.message(seen))
            return message

        await self.app(scope, limited, send)

    def message(self, n: int) -> str:
        return (f"the request body is {n:,} bytes, over the limit of {self.limit:,} "
                f"(medsim serve --max-upload-mb)")


# ------------------------------------------------------------------ the app
def create_app(cfg: ServeConfig | None = None, service: Service | None = None) -> FastAPI:
    cfg = cfg or ServeConfig()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        svc = service or Service(cfg)
        await run_in_threadpool(svc.open)
        app.state.service = svc
        log.info("medsim serve ready")
        try:
            yield
        finally:
            await run_in_threadpool(svc.close)

    app = FastAPI(title="medsim", version="0.1.0", lifespan=lifespan,
                  summary="Medical image similarity search on PostgreSQL + pgvector",
                  description="Search by an uploaded image, a stored image id or a raw vector. "
                              "The web page is at `/`.")
    app.add_middleware(BodyLimit, limit=cfg.max_upload_bytes)

    def svc(request: Request) -> Service:
        return request.app.state.service

    @app.middleware("http")
    async def count(request: Request, call_next):
        t0 = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            if hasattr(request.app.state, "service"):
                request.app.state.service.metrics.request(request.method, path, status, time.perf_counter() - t0)

    @app.exception_handler(MedsimError)
    async def medsim_error(request: Request, err: MedsimError):
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        return error_response(BadArgument(_explain(err.errors())))

    @app.exception_handler(Exception)
    async def bug(request: Request, err: Exception):
        import psycopg
        import psycopg_pool

        if isinstance(err, psycopg.OperationalError | psycopg_pool.PoolTimeout):
            log.warning("database trouble on %s %s: %s", request.method, request.url.path, err)
            return error_response(DatabaseUnavailable(
                f"the database is unavailable or overloaded ({type(err).__name__}); try again"))
        rid = uuid.uuid4().hex[:12]
        log.error("request %s failed: %s %s", rid, request.method, request.url.path, exc_info=err)
        return JSONResponse({"error": "InternalError",
                             "detail": f"an internal error; the server log has it as request {rid}"},
                            status_code=500)

    # --------------------------------------------------------------- search
    @app.post("/search", response_model=SearchResponse, responses=ERRORS, tags=["search"],
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": {"$ref": "#/components/schemas/SearchRequest"}},
                  "multipart/form-data": {"schema": {
                      "type": "object", "required": ["image"],
                      "properties": {"image": {"type": "string", "format": "binary",
                                               "description": "PNG, JPEG, TIFF, BMP, GIF, WebP or DICOM"},
                                     "k": {"type": "integer"}, "engine": {"type": "string"},
                                     "filters": {"type": "string", "description": "JSON object"},
                                     "include_own_patient": {"type": "boolean"},
                                     "per_patient": {"type": "integer"}, "max_distance": {"type": "number"},
                                     "model": {"type": "integer"}}}}}}})
    async def search(request: Request) -> SearchResponse:
        """Search the gallery (train + val) for the k images nearest the query.

        JSON body: `image_id` or `vector`, plus options. Multipart form: a file field
        `image` plus the same options as form fields (`filters` as a JSON string)."""
        t0 = time.perf_counter()
        upload, name, kind = None, "the upload", None
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            form = await request.form(max_files=1, max_fields=16)
            fields = {}
            try:
                for key, value in form.multi_items():
                    if key == "image":
                        if isinstance(value, str):
                            raise BadArgument("the image field must be a file upload")
                        upload, name = await value.read(), value.filename or "the upload"
                    else:
                        if not isinstance(value, str):
                            raise BadArgument(f"{key} must be a form field, not a file")
                        fields[key] = _form_value(key, value)
            finally:
                await form.close()
            if upload is None:
                raise BadArgument("a multipart search needs its image in a file field named 'image'")
            if not upload:
                raise BadArgument(f"{name} is empty")
            req = _validated(fields)
            kind = "upload"
        elif ctype.startswith("application/json"):
            try:
                raw = json.loads(await request.body())
            except ValueError as err:
                raise BadArgument(f"the body is not JSON ({err})") from None
            if not isinstance(raw, dict):
                raise BadArgument("the body must be a JSON object")
            req = _validated(raw)
            kind = "vector" if req.vector is not None else "image_id"
        else:
            raise BadArgument("send application/json (image_id or vector) or multipart/form-data (an image "
                              f"file field named 'image'), not {ctype or 'no content type'}")
        out = await run_in_threadpool(
            svc(request).search, image_id=req.image_id, vector=req.vector, upload=upload, upload_name=name,
            k=req.k, engine=req.engine, filters=req.filters, include_own_patient=req.include_own_patient,
            per_patient=req.per_patient, max_distance=req.max_distance, model=req.model)
        q = out.query
        return SearchResponse(
            model=ModelBrief(id=out.model.id, name=out.model.name, embedding_dim=out.model.embedding_dim),
            engine=out.engine, index_build=out.index_build,
            query=QueryInfo(kind=kind, label=q.label, image_id=q.image_id, dataset=q.dataset,
                            label_name=q.label_name, in_gallery=q.in_gallery),
            vote=q.vote, neighbours=[Neighbour(**h) for h in hit_rows(out)], notes=out.notes,
            timing_ms=round((time.perf_counter() - t0) * 1000, 3))

    # --------------------------------------------------------------- images
    @app.get("/images/random", tags=["images"], responses=ERRORS)
    def random_image(request: Request, split: Literal["train", "val", "test"] = "test",
                     dataset: str | None = None) -> dict:
        """A random stored image id (the page's "random test image")."""
        return {"image_id": svc(request).random_image(split, dataset)}

    @app.get("/images/{image_id}", tags=["images"], responses=ERRORS)
    def image(request: Request, image_id: int) -> dict:
        """An image's metadata: dataset, split, labels, size, patient key, DICOM tags kept."""
        d = svc(request).image(image_id)
        d["thumbnail_url"] = f"/images/{image_id}/thumbnail.png"
        return d

    @app.get("/images/{image_id}/thumbnail.png", tags=["images"], responses={**ERRORS, 200: {
        "content": {"image/png": {}}, "description": "the stored pixels as PNG"}}, response_class=Response)
    def thumbnail(request: Request, image_id: int,
                  size: Annotated[int, Query(ge=16, le=THUMBNAIL_MAX)] = 256) -> Response:
        """The stored pixels as a PNG, at most `size` px on the long side (never enlarged:
        the page scales small images up without smoothing). Cached by ETag (the
        image's sha256): a revalidation costs one indexed lookup, no rendering."""
        s = svc(request)
        sha = s.sha256(image_id)
        if sha is None:
            raise NotFound(f"no image with id {image_id}")
        etag = f'"{sha}-{size}"'
        headers = {"ETag": etag, "Cache-Control": "private, max-age=86400"}
        if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
            return Response(status_code=304, headers=headers)
        png, _ = s.thumbnail(image_id, size)
        return Response(png, media_type="image/png", headers=headers)

    # --------------------------------------------------------------- the rest
    @app.get("/models", tags=["state"])
    def models(request: Request) -> list[dict]:
        """Registered models, the current one marked."""
        return [vars(m) for m in svc(request).models()]

    @app.get("/datasets", tags=["state"])
    def datasets(request: Request) -> list[dict]:
        """Datasets with their label names and images per split (the page's filters)."""
        return svc(request).datasets()

    @app.get("/status", tags=["state"])
    def status(request: Request) -> list[dict]:
        """Embedding progress per model and dataset (the medsim.embedding_status view)."""
        return [r.__dict__ for r in svc(request).status()]

    @app.get("/healthz", tags=["state"], responses={503: {"description": "not ready; the body says why"}})
    def healthz(request: Request) -> JSONResponse:
        """200 when the database is reachable, the schema current and the current model
        loaded; 503 with the failing check otherwise."""
        ok, checks = svc(request).health()
        return JSONResponse({"ok": ok, **checks}, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["state"], response_class=PlainTextResponse)
    def metrics(request: Request) -> PlainTextResponse:
        """Prometheus text format: requests by route and status, latency per route and per
        search stage (decode, embed, search, fetch), pool usage."""
        s = svc(request)
        st = s.reader.get_stats()
        gauges = {"medsim_read_pool_size": st.get("pool_size", 0),
                  "medsim_read_pool_available": st.get("pool_available", 0),
                  "medsim_read_pool_waiting": st.get("requests_waiting", 0),
                  "medsim_models_loaded": len(s.nets), "medsim_faiss_indexes_loaded": len(s.indexes)}
        return PlainTextResponse(s.metrics.render(gauges), media_type="text/plain; version=0.0.4")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(str(STATIC / "index.html"), media_type="text/html")

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    return app


# Form fields arrive as strings: these are parsed into the JSON types the model expects.
FORM_JSON = {"filters", "vector"}


def _form_value(key: str, value: str):
    if key in FORM_JSON:
        try:
            return json.loads(value)
        except ValueError as err:
            raise BadArgument(f"{key} must be JSON ({err})") from None
    return value


def _validated(fields: dict) -> SearchRequest:
    try:
        return SearchRequest.model_validate(fields)
    except ValidationError as err:
        raise BadArgument(_explain(err.errors())) from None


def _explain(errors) -> str:
    parts = []
    for e in errors:
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "the request"
        msg = "unknown field (not accepted)" if e.get("type") == "extra_forbidden" else e.get("msg", "invalid")
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)


def serve(cfg: ServeConfig, access_log: bool = False) -> None:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(cfg), host=cfg.host, port=cfg.port, access_log=access_log, log_level="info",
                timeout_graceful_shutdown=5)
