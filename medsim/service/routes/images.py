"""Stored images: a page of them (browse), a random one, an image's record, its thumbnail,
a larger preview, its stored embedding. Each is looked up as the user who asks (row-level
security): an image outside their grants is "no image with id N", exactly as one that does
not exist, and a page of images holds only what they may see."""

from __future__ import annotations

import json
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response

from medsim.errors import BadArgument, NotFound
from medsim.search.request import MAX_FILTER_VALUE_CHARS, MAX_ID, check_where
from medsim.service import reads
from medsim.service.deps import Admin, Searcher, ServiceDep, Viewer, client_address
from medsim.service.schemas import ERRORS

router = APIRouter(prefix="/images", tags=["images"], responses=ERRORS)

THUMBNAIL_MAX = 512
PREVIEW_MAX = 1024
BROWSE_MAX = 200
# an id is a bigint: a larger number is refused here (400), never sent to the database
ImageId = Annotated[int, Path(ge=1, le=MAX_ID, description="a stored image's id")]


@router.get("")
def list_images(request: Request, svc: ServiceDep, who: Viewer, dataset: str | None = None,
                split: Literal["train", "val", "test"] | None = None, label: str | None = None,
                modality: str | None = None,
                patient_key: Annotated[str | None, Query(max_length=MAX_FILTER_VALUE_CHARS)] = None,
                filters: Annotated[str | None, Query(description='more metadata filters as a JSON object, '
                                                     'e.g. {"site": "north"}')] = None,
                offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
                limit: Annotated[int, Query(ge=1, le=BROWSE_MAX)] = 48) -> dict:
    """Browse what is on file: images in id order, any split, filtered as searches are
    (dataset, split, label, modality, any metadata key) and by patient key; `total` counts
    every match, `images` is one page of them."""
    where = _filters(filters)
    where.update({k: v for k, v in (("dataset", dataset), ("split", split), ("label", label),
                                    ("modality", modality)) if v})
    check_where(where)
    page = reads.list_images(svc, who, where, patient_key, offset, limit)
    svc.log(who, client_address(request), "browse", [d["id"] for d in page["images"]])
    return page


def _filters(text: str | None) -> dict:
    if not text:
        return {}
    try:
        where = json.loads(text)
    except ValueError:
        where = None
    if not isinstance(where, dict) or not all(isinstance(v, str | list) for v in where.values()):
        raise BadArgument('filters must be a JSON object of metadata keys and values, e.g. {"site": "north"}')
    return where


@router.get("/random")
def random_image(svc: ServiceDep, who: Searcher, split: Literal["train", "val", "test"] = "test",
                 dataset: str | None = None) -> dict:
    """A random stored image id (the page's "random test image") among the user's datasets."""
    return {"image_id": reads.random_image(svc, who, split, dataset)}


@router.get("/{image_id}")
def image(request: Request, svc: ServiceDep, who: Viewer, image_id: ImageId) -> dict:
    """An image's metadata: dataset, split, labels, size, patient key, DICOM tags kept."""
    d = reads.image(svc, who, image_id)
    svc.log(who, client_address(request), "image", [image_id])
    d["thumbnail_url"] = f"/images/{image_id}/thumbnail.png"
    links = reads.viewer_links(svc, [image_id])
    if links:  # an image a PACS sync stored: the way back to it
        d["viewer_url"], d["original_url"] = links[image_id], f"/images/{image_id}/original"
    return d


@router.get("/{image_id}/original", response_class=Response,
            responses={200: {"content": {"application/dicom": {}}, "description": "the original DICOM instance"}})
def original(request: Request, svc: ServiceDep, who: Admin, image_id: ImageId) -> Response:
    """The original DICOM instance of an image a PACS sync stored, fetched from the PACS
    now (Postgres keeps a rendition at model size). Admins only: the file carries every tag
    the PACS holds, names included. 404 for an image medsim holds whole; 502 when the PACS
    cannot be reached."""
    if reads.sha256(svc, who, image_id) is None:  # visible to this user at all?
        raise NotFound(f"no image with id {image_id}")
    data, name = reads.original(svc, image_id)
    svc.log(who, client_address(request), "original", [image_id])
    return Response(data, media_type="application/dicom",
                    headers={"Content-Disposition": f'attachment; filename="{name}"', "Cache-Control": "no-store"})


@router.get("/{image_id}/thumbnail.png", response_class=Response,
            responses={200: {"content": {"image/png": {}}, "description": "the stored pixels as PNG"}})
def thumbnail(request: Request, svc: ServiceDep, who: Viewer, image_id: ImageId,
                    size: Annotated[int, Query(ge=16, le=THUMBNAIL_MAX)] = 256) -> Response:
    """The stored pixels as a PNG, at most `size` px on the long side (never enlarged:
    the page scales small images up without smoothing). Cached by ETag (the
    image's sha256): a revalidation costs one indexed lookup, no rendering, no log row."""
    return _cached_png(request, svc, who, image_id, "thumbnail", f"{size}",
                       lambda: reads.thumbnail(svc, image_id, size))


@router.get("/{image_id}/preview.png", response_class=Response,
            responses={200: {"content": {"image/png": {}}, "description": "the stored pixels, scaled, as PNG"}})
def preview(request: Request, svc: ServiceDep, who: Viewer, image_id: ImageId,
            size: Annotated[int, Query(ge=64, le=PREVIEW_MAX)] = 384, smooth: bool = False,
            window: Literal["stored", "auto"] = "stored") -> Response:
    """The stored pixels at `size` px on the long side, for a closer look: scaled up by
    nearest neighbour (a 28 px image shows its 28 x 28 squares: nothing is invented), or
    bicubic with smooth=true. window=auto stretches the image's 1st-99th percentile to full
    contrast (16-bit and faint images); stored is the bit-depth rule the model sees."""
    return _cached_png(request, svc, who, image_id, "preview", f"p{size}-{int(smooth)}-{window}",
                       lambda: reads.thumbnail(svc, image_id, size, enlarge=True, smooth=smooth, window=window))


def _cached_png(request: Request, svc, who, image_id: int, action: str, variant: str, draw) -> Response:
    """A rendering of a stored image, cached by ETag (the image's sha256 and the variant):
    a revalidation costs one indexed lookup as the user, no rendering, no log row."""
    sha = reads.sha256(svc, who, image_id)
    if sha is None:
        raise NotFound(f"no image with id {image_id}")
    etag = f'"{sha}-{variant}"'
    headers = {"ETag": etag, "Cache-Control": "private, max-age=86400"}
    if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
        return Response(status_code=304, headers=headers)
    png = draw()
    svc.log(who, client_address(request), action, [image_id])
    return Response(png, media_type="image/png", headers=headers)


@router.get("/{image_id}/embedding")
def embedding(request: Request, svc: ServiceDep, who: Viewer, image_id: ImageId, model: str = "current") -> dict:
    """The image's stored embedding for a model (default: the current one), to search by
    vector (`POST /search` with `{"vector": [...]}`) or to use elsewhere."""
    found = reads.embedding(svc, who, image_id, model)
    svc.log(who, client_address(request), "embedding", [image_id], model_id=found["model_id"])
    return found


# HEAD too (a client or a proxy checking a thumbnail without fetching it): the same
# function, out of the schema so that OpenAPI lists one operation
router.add_api_route("/{image_id}/thumbnail.png", thumbnail, methods=["HEAD"], include_in_schema=False,
                     response_class=Response)
