"""A kept upload's preview (medsim.service.uploads): what an upload search's URL shows as
its query, whatever the file was (DICOM, TIFF, 16-bit), since the browser cannot draw most
of them."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from medsim.images import to_display
from medsim.service import reads, uploads
from medsim.service.deps import Searcher, ServiceDep, client_address
from medsim.service.routes.images import PREVIEW_MAX
from medsim.service.schemas import ERRORS

router = APIRouter(prefix="/uploads", tags=["search"], responses=ERRORS)


@router.get("/{handle}/preview.png", response_class=Response,
            responses={200: {"content": {"image/png": {}}, "description": "the kept upload, scaled, as PNG"}})
async def upload_preview(request: Request, svc: ServiceDep, who: Searcher, handle: str,
                         size: Annotated[int, Query(ge=16, le=PREVIEW_MAX)] = 384, smooth: bool = False,
                         window: Literal["stored", "auto"] = "stored") -> Response:
    """A kept upload rendered from its stored-form pixels, like an image's preview (scaled
    up by nearest neighbour unless smooth). Its uploader's only; 404 once the upload is no
    longer kept. Each preview served is an access-log row with the upload's sha256."""

    def draw() -> bytes:
        kept = uploads.load(svc, handle, who)
        png = reads.render(to_display(kept.array(), window), size, enlarge=True, smooth=smooth)
        svc.log(who, client_address(request), "preview", [], query_kind="upload", query_sha256=kept.sha256)
        return png

    png = await run_in_threadpool(draw)
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})
