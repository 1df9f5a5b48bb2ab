"""The HTTP API and the web page: FastAPI over medsim.service.state.Service.

FastAPI + uvicorn: the standard ASGI stack, with the OpenAPI schema (`/docs`) generated
from the same pydantic models that validate requests (schemas.py). Routes live in one
router per resource (routes/); what they share is created once at start-up (the lifespan)
and handed to them as a dependency (deps.py). Handlers that touch the database or the
network run in Starlette's thread pool; psycopg and torch release the GIL while they wait
or compute.

Errors: a `MedsimError` becomes its `http_status` with `{"error": class, "detail":
sentence}`; a request that fails validation is a 400 of the same shape naming the field
(like every BadArgument); anything else is a 500 whose traceback goes to the log under a
request id, and the client gets only that id.
"""

from __future__ import annotations

import copy
import logging
import time
import uuid
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from medsim.errors import (
    BadArgument,
    DatabaseUnavailable,
    MedsimError,
    NotFound,
    TooLarge,
    Unauthorized,
)
from medsim.search.request import MAX_JSON_BYTES
from medsim.service.guard import SecurityHeaders
from medsim.service.routes import explain as explain_routes
from medsim.service.routes import images, search, state, uploads
from medsim.service.state import ServeConfig, Service

log = logging.getLogger("medsim.serve")

STATIC = resources.files("medsim.service") / "static"
SWAGGER = resources.files("fastapi_offline") / "static"  # Swagger UI 5's bundle and css, from the wheel


def error_response(err: MedsimError, **headers) -> JSONResponse:
    """The one shape every refusal has: {"error": class, "detail": sentence}."""
    if isinstance(err, Unauthorized):
        headers.setdefault("WWW-Authenticate", "Bearer")
    if getattr(err, "retry_after", None):
        headers.setdefault("Retry-After", str(err.retry_after))
    return JSONResponse({"error": type(err).__name__, "detail": str(err)}, status_code=err.http_status,
                        headers=headers or None)


class BodyLimit:
    """Refuses a request body over the limit before it is read: by Content-Length when
    the client sends one, else while it streams in (chunked uploads). Only a multipart
    body (an image upload) may reach the upload limit; any other (JSON) stops at
    MAX_JSON_BYTES, far more than a search needs, so that parsing it costs little."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        upload = headers.get(b"content-type", b"").startswith(b"multipart/")
        limit = self.limit if upload else min(self.limit, MAX_JSON_BYTES)
        message = self.message if limit == self.limit else self.json_message
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            response = error_response(TooLarge(message(int(declared))), connection="close")
            return await response(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            received = await receive()
            if received["type"] == "http.request":
                seen += len(received.get("body", b""))
                if seen > limit:
                    # FastAPI turns any error while it parses a body into a plain 400; the
                    # refusal is noted for the error handlers, which answer 413 with it
                    scope.setdefault("state", {})["too_large"] = message(seen)
                    raise TooLarge(message(seen))
            return received

        await self.app(scope, limited, send)

    @staticmethod
    def json_message(n: int) -> str:
        return (f"the request body is {n:,} bytes, over the limit of {MAX_JSON_BYTES // 2**20} MB for a request "
                f"that is not an image upload (an image goes to POST /search/upload)")

    def message(self, n: int) -> str:
        return (f"the request body is {n:,} bytes, over the limit of {self.limit:,} "
                f"(`medsim serve --max-upload-mb N` raises it)")


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

    # /docs is served below from files in a wheel (fastapi-offline's Swagger UI), not FastAPI's
    # default, which loads Swagger UI from a CDN and runs an inline script; no ReDoc
    app = FastAPI(title="medsim", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  summary="Medical image similarity search on PostgreSQL + pgvector",
                  description="Search by an uploaded image, a stored image id or a raw vector. "
                              "The web page is at `/`.")
    app.add_middleware(BodyLimit, limit=cfg.max_upload_bytes)
    app.add_middleware(SecurityHeaders)
    app.middleware("http")(count_requests)
    add_error_handlers(app)
    for r in (search.router, images.router, uploads.router, explain_routes.router, state.router):
        app.include_router(r)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(str(STATIC / "index.html"), media_type="text/html")

    @app.get("/docs", include_in_schema=False)
    def docs() -> FileResponse:
        return FileResponse(str(STATIC / "docs.html"), media_type="text/html")

    app.mount("/static/swagger", StaticFiles(directory=str(SWAGGER)), name="swagger")
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    return app


async def count_requests(request: Request, call_next):
    """Every request into /metrics: method, route, status, seconds."""
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


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(MedsimError)
    async def medsim_error(request: Request, err: MedsimError):
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        ctype = request.headers.get("content-type", "")
        if request.url.path == "/search" and not ctype.startswith("application/json"):
            return error_response(BadArgument(f"send application/json (an image_id or a vector), not "
                                              f"{ctype or 'no content type'}; an image file goes to POST "
                                              f"/search/upload (multipart)"))
        return error_response(BadArgument(explain(err.errors())))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        # Starlette's own refusals (an unknown route, a wrong method, a malformed multipart
        # body) in the same shape as medsim's
        too_large = getattr(request.state, "too_large", None)
        if too_large:
            return error_response(TooLarge(too_large), connection="close")
        if err.status_code == 404:
            mapped = NotFound(f"no such endpoint: {request.method} {request.url.path} (the API is listed at /docs)")
        elif err.status_code == 405:
            mapped = BadArgument(f"{request.method} is not allowed on {request.url.path} (allowed: "
                                 f"{(err.headers or {}).get('allow', 'see /docs')})")
            mapped.http_status = 405
        else:
            mapped = BadArgument(str(err.detail))
            mapped.http_status = err.status_code
        return error_response(mapped, **(err.headers or {}))

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


def explain(errors) -> str:
    parts = []
    for e in errors:
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "the request"
        msg = "unknown field (not accepted)" if e.get("type") == "extra_forbidden" else e.get("msg", "invalid")
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)


def serve(cfg: ServeConfig, access_log: bool = False) -> None:
    import uvicorn

    prefix = "" if cfg.auth else "[NO AUTH] "
    logging.basicConfig(level=logging.INFO, format=f"{prefix}%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    for f in config["formatters"].values():  # uvicorn's own lines carry the prefix too
        f["fmt"] = prefix + f["fmt"]
    # proxy_headers=False: uvicorn would otherwise believe X-Forwarded-For from any loopback
    # peer; deps.client_address reads it, only from --forwarded-allow-ips, and logs both
    uvicorn.run(create_app(cfg), host=cfg.host, port=cfg.port, access_log=access_log, log_level="info",
                proxy_headers=False,
                timeout_graceful_shutdown=5, log_config=config)
