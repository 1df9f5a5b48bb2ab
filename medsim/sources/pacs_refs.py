"""The way back to the PACS for an image a sync stored: its study in the PACS's viewer, and
its original DICOM (Postgres keeps a rendition at model size, not the file).

Both read medsim.pacs_instances, which only the owner may read (the UIDs are there in
clear): callers pass an owner connection, and only for images the person may see.
"""

from __future__ import annotations

from dataclasses import dataclass

from medsim.errors import NotFound
from medsim.queries import Q
from medsim.sources.pacs_client import Server


@dataclass
class Ref:
    image_id: int
    study: str
    series: str
    sop: str
    orthanc_study: str | None
    url: str
    viewer: str | None

    def viewer_url(self) -> str | None:
        if not self.viewer:
            return None
        root = self.url[: -len("/dicom-web")] if self.url.endswith("/dicom-web") else self.url
        try:
            return self.viewer.format(study=self.study, series=self.series, sop=self.sop, root=root,
                                      dicomweb=self.url, orthanc_study=self.orthanc_study or "")
        except (KeyError, IndexError, ValueError):  # a template with a placeholder we do not know
            return None


def refs(conn, image_ids) -> dict[int, Ref]:
    ids = sorted({int(i) for i in image_ids})
    if not ids:
        return {}
    return {r[0]: Ref(*r) for r in conn.execute(Q.pacs_links, {"ids": ids}).fetchall()}


def viewer_links(conn, image_ids) -> dict[int, str]:
    """image id -> a link to its study in the PACS's viewer, for the images that have one."""
    return {i: u for i, r in refs(conn, image_ids).items() if (u := r.viewer_url())}


def original(conn, image_id: int) -> tuple[bytes, Ref]:
    """The original instance's bytes, fetched from the PACS now (WADO-RS), or NotFound when
    the image did not come from a PACS. PacsUnavailable / FetchFailed say why not."""
    ref = refs(conn, [image_id]).get(int(image_id))
    if ref is None:
        raise NotFound(f"image {image_id} did not come from a PACS: medsim holds it whole (GET /images/{image_id})")
    return Server.at(ref.url).retrieve_bytes(ref.study, ref.series, ref.sop), ref
