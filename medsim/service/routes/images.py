"""Stored images: a random one, an image's record, its thumbnail. Each is looked up as
the user who asks (row-level security): an image outside their grants is "no image with
id N", exactly as one that does not exist."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from medsim.errors import NotFound
from medsim.service import reads
from medsim.service.deps import Searcher, ServiceDep, Viewer, client_address
from medsim.service.schemas import ERRORS

router = APIRouter(prefix="/images", tags=["images"], responses=ERRORS)

THUMBNAIL_MAX = 512


@router.get("/random")
def random_image(svc: ServiceDep, who: Searcher, split: Literal["train", "val", "test"] = "test",
                 dataset: str | None = None) -> dict:
    """A random stored image id (the page's "random test image") among the user's datasets."""
    return {"image_id": reads.random_image(svc, who, split, dataset)}


@router.get("/{image_id}")
def image(request: Request, svc: ServiceDep, who: Viewer, image_id: int) -> dict:
    """An image's metadata: dataset, split, labels, size, patient key, DICOM tags kept."""
    d = reads.image(svc, who, image_id)
    svc.log(who, client_address(request), "image", [image_id])
    d["thumbnail_url"] = f"/images/{image_id}/thumbnail.png"
    return d


@router.get("/{image_id}/thumbnail.png", response_class=Response,
            responses={200: {"content": {"image/png": {}}, "description": "the stored pixels as PNG"}})
def thumbnail(request: Request, svc: ServiceDep, who: Viewer, image_id: int,
                    size: Annotated[int, Query(ge=16, le=THUMBNAIL_MAX)] = 256) -> Response:
    """The stored pixels as a PNG, at most `size` px on the long side (never enlarged:
    the page scales small images up without smoothing). Cached by ETag (the
    image's sha256): a revalidation costs one indexed lookup, no rendering, no log row."""
    sha = reads.sha256(svc, who, image_id)
    if sha is None:
        raise NotFound(f"no image with id {image_id}")
    etag = f'"{sha}-{size}"'
    headers = {"ETag": etag, "Cache-Control": "private, max-age=86400"}
    if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
        return Response(status_code=304, headers=headers)
    png = reads.thumbnail(svc, image_id, size)
    svc.log(who, client_address(request), "thumbnail", [image_id])
    return Response(png, media_type="image/png", headers=headers)


# HEAD too (a client or a proxy checking a thumbnail without fetching it): the same
# function, out of the schema so that OpenAPI lists one operation
router.add_api_route("/{image_id}/thumbnail.png", thumbnail, methods=["HEAD"], include_in_schema=False,
                     response_class=Response)
