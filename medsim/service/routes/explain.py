"""GET /explain: where a (query, neighbour) pair's closeness comes from, as two maps
(medsim.model.explain): PNG overlays, or the arrays in JSON. The query is a stored
image id or a kept upload's handle; both images are read as the user (row-level
security), then from the owner's pixels, and resized by the one resize path."""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from medsim import images, registry
from medsim.errors import BadArgument, NotFound
from medsim.search.request import MAX_ID, parse_id
from medsim.service import reads, uploads
from medsim.service.deps import ServiceDep, Viewer, client_address
from medsim.service.schemas import ERRORS

router = APIRouter(tags=["explain"], responses=ERRORS)

WHAT = ("how much of the pair's closeness each pixel of this image holds, the other image fixed: where "
        "removing the detail (blurring it) would move the two apart; not the reason for a diagnosis")


def _pixels(svc, who, image_id: int | None, handle: str | None = None) -> tuple[np.ndarray, str | None]:
    """A stored image (as the user may see it) or the user's kept upload -> (stored-form
    pixels, the upload's sha256 for the log)."""
    if image_id is None:
        kept = uploads.load(svc, handle, who)
        return kept.array(), kept.sha256
    if reads.sha256(svc, who, image_id) is None:  # not on file, or not the user's to see
        raise NotFound(f"no image with id {image_id}")
    return reads.stored(svc, image_id).array(), None


def _overlay(x: np.ndarray, m: np.ndarray, size: int) -> bytes:
    """The image in grey with the map in red on top (alpha = the map's strength), at size px."""
    from PIL import Image

    grey = images.to_display(x)
    grey = grey if grey.ndim == 2 else grey.mean(-1).astype(np.uint8)
    img = np.asarray(Image.fromarray(grey).resize((size, size), Image.Resampling.NEAREST), np.float32)
    heat = np.asarray(Image.fromarray((m * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BILINEAR),
                      np.float32) / 255
    rgb = np.stack([img * (1 - heat) + 255 * heat, img * (1 - heat), img * (1 - heat)], -1)
    return reads.render(np.clip(rgb, 0, 255).astype(np.uint8), size)


@router.get("/explain", response_model=None,
            responses={200: {"content": {"image/png": {}, "application/json": {}},
                             "description": "an overlay (PNG) or both maps (JSON)"}})
async def explain_pair(request: Request, svc: ServiceDep, who: Viewer,
                       query: Annotated[str, Query(max_length=64, description="a stored image id or an upload's handle")],
                       neighbour: Annotated[int, Query(ge=1, le=MAX_ID)], format: Literal["json", "png"] = "json",
                       which: Literal["query", "neighbour"] = "neighbour",
                       method: Literal["integrated_gradients", "occlusion", "gradient"] = "integrated_gradients",
                       size: Annotated[int, Query(ge=64, le=1024)] = 256, model: str = "current"):
    """Similarity maps for a query and one of its neighbours: for each image, how much of
    the pair's closeness each of its pixels holds (integrated gradients of the negative
    distance from the blurred image, captum; see docs/results.md for how faithful each
    method is). `format=png` returns one overlay (`which`), `json` both maps in [0, 1]
    with each map's deletion test run now (`faithfulness`: its deletion AUC, a random
    order's, and whether it is at most half of it)."""
    from medsim.model import explain

    query_id = parse_id(query)
    if query_id is None and not uploads.HANDLE_RULE.fullmatch(query):
        raise BadArgument(f"query is an image id (ASCII digits) or an upload's handle, got {query!r}")

    def work():
        with svc.owner.connection() as conn:
            row = registry.get(conn, model)
        rt = svc.net(row)
        s = rt.cfg.image_size
        (xa, sha), (xb, _) = _pixels(svc, who, query_id, query), _pixels(svc, who, neighbour)
        a, b = images.model_input(xa, s), images.model_input(xb, s)
        svc.size_threads()
        used = explain.method_for(rt.net, method)
        ma, mb = explain.pair_maps(rt.net, a, b, used)
        check = explain.faithfulness(rt.net, a, b, ma, mb) if format == "json" else None
        return row, xa, xb, explain.display(ma), explain.display(mb), check, sha, used

    row, xa, xb, ma, mb, check, sha, method = await run_in_threadpool(work)
    svc.log(who, client_address(request), "explain", [neighbour] + ([query_id] if query_id is not None else []),
            query_kind="upload" if query_id is None else "image_id", query_image_id=query_id, query_sha256=sha,
            model_id=row.id)
    if format == "png":
        png = await run_in_threadpool(_overlay, *((xa, ma) if which == "query" else (xb, mb)), size)
        return Response(png, media_type="image/png")
    return {"model_id": row.id, "method": method, "baseline": "blur", "what": WHAT,
            "query": np.round(ma, 4).tolist(), "neighbour": np.round(mb, 4).tolist(),
            # the deletion test at run time: a map that does not pass it is said to
            "faithfulness": check}
