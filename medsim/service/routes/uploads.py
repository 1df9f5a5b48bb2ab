"""A kept upload's preview (medsim.service.uploads): what an upload search's URL shows as
its query, whatever the file was (DICOM, TIFF, 16-bit), since the browser cannot draw most
of them."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from medsim.images import to_display
from medsim.service import reads, uploads
from medsim.service.deps import Searcher, ServiceDep
from medsim.service.routes.images import PREVIEW_MAX
from medsim.service.schemas import ERRORS

router = APIRouter(prefix="/uploads", tags=["search"], responses=ERRORS)


@router.get("/{handle}/preview.png", response_class=Response,
            responses={200: {"content": {"image/png": {}}, "description": "the kept upload, scaled, as PNG"}})
async def upload_preview(svc: ServiceDep, _: Searcher, handle: str,
                         size: Annotated[int, Query(ge=16, le=PREVIEW_MAX)] = 384, smooth: bool = False,
                         window: Literal["stored", "auto"] = "stored") -> Response:
    """A kept upload rendered from its stored-form pixels, like an image's preview (scaled
    up by nearest neighbour unless smooth). 404 once the upload is no longer kept."""

    def draw() -> bytes:
        return reads.render(to_display(uploads.load(svc, handle), window), size, enlarge=True, smooth=smooth)

    png = await run_in_threadpool(draw)
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})
