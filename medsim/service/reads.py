"""What the service reads besides searches: an image's record and thumbnail, a random image,
models, datasets, embedding status, health. Functions over the Service's pools."""

from __future__ import annotations

import io

import numpy as np
from psycopg.types.json import Jsonb

from medsim import access, migrate, queue, registry
from medsim.errors import NotFound
from medsim.images import StoredRow
from medsim.queries import Q, dicts, one, scalar
from medsim.sources import pacs_refs


def image(svc, who, image_id: int) -> dict:
    with svc.connection(who) as conn, svc.metrics.stage("fetch"):
        found = dicts(conn, Q.image_details, {"id": image_id})
    if not found:
        raise NotFound(f"no image with id {image_id}")
    return found[0]


def thumbnail(svc, image_id: int, size: int, enlarge: bool = False, smooth: bool = True,
              window: str = "stored") -> bytes:
    """PNG bytes, rendered from the stored pixels (16-bit by the bit-depth rule, or the
    window asked for), size px on the long side: a thumbnail is only ever shrunk (the page
    scales small ones up itself); a preview (enlarge) is scaled up too, by nearest
    neighbour (each stored pixel a visible square, nothing invented) or bicubic (smooth).
    Grey stays grey. The pixels are the owner's to read: call it only for an id the user's
    own connection has shown them (sha256)."""

    return render(stored(svc, image_id).display_or_refuse(window), size, enlarge, smooth)


def attach_viewer_links(svc, who, hits) -> None:
    """Each hit from a PACS gets its study's link in the PACS's viewer. The link carries the
    study's UID (or Orthanc's id of it), so only principals who may see images get it;
    the UIDs are the owner's to read (medsim.pacs_instances)."""
    if not hits or (who is not None and not who.allows("images")):
        return
    links = viewer_links(svc, [h.image_id for h in hits])
    for h in hits:
        h.viewer_url = links.get(h.image_id)


def viewer_links(svc, image_ids) -> dict:
    with svc.owner.connection() as conn:
        return pacs_refs.viewer_links(conn, image_ids)


def original(svc, image_id: int) -> tuple[bytes, str]:
    """The original DICOM of an image a PACS sync stored, fetched from the PACS now, and
    the file name to give it. Only for an id the user's own connection has shown them."""
    with svc.owner.connection() as conn:
        data, ref = pacs_refs.original(conn, image_id)
    return data, f"{image_id}.dcm"


def stored(svc, image_id: int) -> StoredRow:
    """An image's stored pixels, read as the owner (the reader role may not): only for an
    id the user's own connection has shown them."""
    with svc.owner.connection() as conn:
        p = one(conn, Q.image_pixels_one, {"id": image_id}, as_=StoredRow)
    if p is None:
        raise NotFound(f"no image with id {image_id}")
    return p


def render(display: np.ndarray, size: int, enlarge: bool = False, smooth: bool = True) -> bytes:
    """8-bit display pixels -> PNG bytes at size px on the long side (see thumbnail)."""
    from PIL import Image

    img = Image.fromarray(display)
    if max(img.size) > size:
        img.thumbnail((size, size), Image.Resampling.LANCZOS)
    elif enlarge and max(img.size) < size:
        scale = size / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                         Image.Resampling.BICUBIC if smooth else Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def embedding(svc, who, image_id: int, model_ref) -> dict:
    """An image's stored vector for a model, as the user (row-level security): what the
    README's search-by-vector example pastes."""
    with svc.connection(who) as conn:
        model = registry.get(conn, model_ref)
        v = scalar(conn, Q.image_embedding, {"id": image_id, "model_id": model.id})
        if v is None:
            if scalar(conn, Q.image_sha256, {"id": image_id}) is None:
                raise NotFound(f"no image with id {image_id}")
            raise NotFound(f"image {image_id} is not embedded for model {model.id} yet (the embedding worker "
                           f"writes it)")
    return {"image_id": image_id, "model_id": model.id, "dim": model.embedding_dim,
            "embedding": [float(x) for x in v.to_numpy()]}


def list_images(svc, who, where: dict, patient_key: str | None, offset: int, limit: int) -> dict:
    """A page of the images on file the user may see, filtered like a search (any split)."""
    with svc.connection(who) as conn:
        found = dicts(conn, Q.list_images, {"filter": Jsonb(where), "patient_key": patient_key,
                                            "offset": offset, "limit": limit})
        total = scalar(conn, Q.count_images_matching, {"filter": Jsonb(where), "patient_key": patient_key})
    for d in found:
        d["thumbnail_url"] = f"/images/{d['id']}/thumbnail.png"
    return {"total": total, "offset": offset, "limit": limit, "images": found}


def sha256(svc, who, image_id: int) -> str | None:
    with svc.connection(who) as conn:
        return scalar(conn, Q.image_sha256, {"id": image_id})


def random_image(svc, who, split: str, dataset: str | None) -> int:
    with svc.connection(who) as conn:
        args = {"split": split, "dataset": dataset}
        found = scalar(conn, Q.random_image, args)
    if found is None:
        raise NotFound(f"no {split} image" + (f" in {dataset}" if dataset else "")
                       + (f": {ungranted(who.name)}" if who is not None and not who.granted else ""))
    return found


def ungranted(name: str) -> str:
    """Why a user granted nothing finds nothing: said at sign-in (/me) and where it shows."""
    return f"user {name} sees no dataset yet: an administrator runs `medsim grant {name} DATASET`"


def me(svc, who) -> dict:
    """Who the token is, what it sees, and what the user must hear at sign-in."""
    with svc.connection(who) as conn:
        seen = access.visible_datasets(conn)
    return {"name": who.name, "scope": who.scope, "sees_all": who.sees_all, "granted": who.granted,
            "datasets": seen, "notice": None if who.granted else ungranted(who.name)}


def models(svc, who) -> list:
    """Models, with the training datasets the user may see (a name is a fact about an
    archive the user may not be granted)."""
    with svc.connection(who) as conn:
        found = registry.list_models(conn)
        visible = None if who.sees_all else set(access.visible_datasets(conn))
    for m in found:
        if visible is not None:
            m.datasets = [d for d in m.datasets or [] if d in visible]
    return found


def compare_models(svc, who, model_ids, measure: bool) -> dict:
    """medsim.training.compare as the owner (checkpoints and pixels are not the reader's),
    showing only the datasets the user may see."""
    from medsim.training import compare

    with svc.owner.connection() as conn:
        c = compare.run(conn, model_ids or None, measure=measure)
    if not who.sees_all:
        with svc.connection(who) as conn:
            visible = set(access.visible_datasets(conn))
        for m in c.models:
            m.datasets = [d for d in m.datasets if d in visible]
            m.by_dataset = [d for d in m.by_dataset if d.dataset in visible]
        c.not_evaluable = {f: why for f, why in c.not_evaluable.items() if f in visible}
        c.to_fill = compare.fill_commands(c.models, c.not_evaluable)
    return c.as_dict()


def datasets(svc, who) -> list[dict]:
    with svc.connection(who) as conn:
        return dicts(conn, Q.datasets_overview)


def status(svc, who) -> list[dict]:
    """medsim.embedding_status as the user sees it, each partial row with its sentence, and
    each model's dataset with its calibration's latest check on recent images (recent)."""
    from medsim.training import recent

    with svc.connection(who) as conn:
        found = queue.status(conn)
        checks = recent.of_models(conn, {r.model_id for r in found})
        return [{**vars(r), "note": r.note, **recent.status_fields(checks.get((r.model_id, r.dataset)), r.dataset)}
                for r in found]


def health(svc) -> tuple[bool, dict]:
    checks: dict = {"database": None, "schema": None, "model": None}
    ok = {"database": False, "schema": False, "model": False}
    try:
        with svc.owner.connection(timeout=2) as conn:  # a liveness check, no one's data
            conn.execute("SELECT 1")
            checks["database"], ok["database"] = "reachable", True
            try:
                with svc.owner.connection(timeout=2) as oc:  # alembic_version is not the reader's
                    migrate.check(oc)
                checks["schema"], ok["schema"] = f"current ({migrate.HEAD})", True
            except Exception as err:
                checks["schema"] = str(err)
                raise
            try:
                row = registry.get(conn, "current")
                checks["model_id"] = row.id
                svc.net(row)  # a model made current since start is loaded here, once
                checks["model"], ok["model"] = f"model {row.id} loaded", True
            except NotFound:
                checks["model"] = "no current model: train one (medsim train)"
            except Exception as err:
                checks["model"] = f"cannot load: {err}"
    except Exception as err:
        if not ok["database"]:
            checks["database"] = f"unreachable: {(str(err).strip().splitlines() or [repr(err)])[0]}"
    checks["read_from"] = "replica (DATABASE_READ_URL)" if svc.read_is_replica else "primary"
    return all(ok.values()), checks
