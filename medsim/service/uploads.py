"""Uploads the service keeps for a while, so that an upload search has a URL.

An uploaded image is kept in its stored form (the pixels an ingest would store: decoded,
windowed, never the file's bytes or name, which may carry a patient's name) under a
random handle, for ServeConfig.upload_retention_h (default 24 h). With the handle the user
who uploaded it (no one else: another user's token gets the 404 of a handle that never
existed) can see its preview and search it again (`POST /search` with `{"upload": HANDLE}`,
or `/?upload=HANDLE` on the page); each use is logged with the upload's sha256. Past its
time it is deleted, at the next upload or start, and the access log notes each deletion
("upload_deleted", with the upload's sha256). Only the service's owner login reads the
table: an analyst's SQL login and a user's role see nothing of it.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

import numpy as np

from medsim import access, images
from medsim.errors import NotFound
from medsim.images import StoredRow
from medsim.queries import Q, one, rows

HANDLE_BYTES = 16  # 128 random bits: a handle cannot be guessed
HANDLE_RULE = re.compile(r"[A-Za-z0-9_-]{1,64}")  # what token_urlsafe makes, with room to spare


@dataclass
class Kept(StoredRow):
    """A kept upload: its stored-form pixels (StoredRow's columns), whose it is, and the
    sha256 of the bytes uploaded (what the access log records for each use of it)."""

    user_name: str
    sha256: str


@dataclass
class Purged:
    user_name: str
    sha256: str


def keep(svc, user: str, x: np.ndarray, sha256: str) -> str | None:
    """Keep stored-form pixels -> their handle (None when retention is 0). Expired uploads
    are deleted first, in the same transaction."""
    hours = svc.cfg.upload_retention_h
    if not hours:
        return None
    handle = secrets.token_urlsafe(HANDLE_BYTES)
    with svc.owner.connection() as conn, conn.transaction():
        purge(conn)
        conn.execute(Q.keep_upload, {"handle": handle, "hours": hours, "user_name": user, "sha256": sha256,
                                     "pixels": images.stored.to_bytes(x), "height": x.shape[0], "width": x.shape[1],
                                     "channels": x.shape[2], "bit_depth": 16 if x.dtype == np.uint16 else 8})
    return handle


def load(svc, handle: str, who: access.Principal) -> Kept:
    """The principal's own kept upload; NotFound, saying why, when it is not (or no longer)
    kept. Another user's upload is answered exactly as a handle that never existed: a
    handle seen over a shoulder or in a shared screenshot is not a grant."""
    r = None
    if HANDLE_RULE.fullmatch(handle):
        with svc.owner.connection() as conn:
            r = one(conn, Q.kept_upload, {"handle": handle}, as_=Kept)
    if r is None or r.user_name != who.name:
        raise NotFound(f"no upload kept under that handle: uploads are kept {svc.cfg.upload_retention_h:g} h, "
                       f"then deleted; upload the image again")
    return r


def purge(conn) -> int:
    """Delete expired uploads, each with an access-log row -> how many."""
    gone = rows(conn, Q.purge_uploads, as_=Purged)
    for g in gone:
        access.log_as(conn, g.user_name, None, None, "upload_deleted", [], query_kind="upload", query_sha256=g.sha256)
    return len(gone)
