"""What routes are handed (FastAPI dependencies): the Service created at start-up, and
who is asking (a Principal, from the bearer token), checked for the scope a route needs."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPBearer

from medsim import access
from medsim.access import Principal
from medsim.errors import Unauthorized
from medsim.service.guard import Client, TrustedProxies, is_loopback
from medsim.service.state import Service

# declared for the OpenAPI page (its Authorize button); the header is read below
bearer = HTTPBearer(auto_error=False, description="a token from `medsim token create NAME`")


def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]
BearerDoc = Annotated[object, Depends(bearer)]


def client_address(request: Request) -> Client:
    """Who sent the request: the peer, or (only when the peer is a trusted proxy:
    medsim serve --forwarded-allow-ips) the address X-Forwarded-For names. The chain as
    received is kept apart for the access log either way."""
    peer = request.client.host if request.client else None
    svc = getattr(request.app.state, "service", None)
    proxies = svc.proxies if svc is not None else TrustedProxies()
    return proxies.client(peer, request.headers.get("x-forwarded-for"))


def authenticate(request: Request, svc: Service) -> Principal:
    """The request's principal: one indexed lookup on the primary per request, so a token
    revoked (or expired) a moment ago fails now, in every running service. The secret is
    checked before any limit applies: a valid token is never refused because of someone
    else's failures (guard.py says why)."""
    if not svc.cfg.auth:
        return access.NO_AUTH
    header = request.headers.get("authorization")
    try:
        with svc.owner.connection() as conn:
            return access.authenticate(conn, header)
    except Unauthorized as err:
        svc.guard.failed(client_address(request).address, err.token_id)  # 429 past the limit
        raise


def scope(needed: str, what: str):
    def dependency(request: Request, svc: ServiceDep, _: BearerDoc) -> Principal:
        p = authenticate(request, svc)
        access.require(p, needed, what)
        return p

    return dependency


def local_or(needed: str, what: str):
    """From this machine (loopback) without a token; from elsewhere, a token with `needed`."""
    with_token = scope(needed, what)

    def dependency(request: Request, svc: ServiceDep, _: BearerDoc) -> Principal | None:
        return None if is_loopback(client_address(request).address) else with_token(request, svc, _)

    return dependency


Searcher = Annotated[Principal, Depends(scope("search", "searching"))]
Viewer = Annotated[Principal, Depends(scope("images", "images and thumbnails"))]
# the original DICOM from a PACS carries every identifying tag the PACS holds (names, birth
# dates), which medsim otherwise never stores or serves: an admin's token only
Admin = Annotated[Principal, Depends(scope("admin", "original DICOM files from the PACS"))]
Operator = Annotated[Principal | None, Depends(local_or("admin", "/metrics from another machine"))]
Anyone = Annotated[Principal | None, Depends(local_or("search", "/healthz from another machine"))]
