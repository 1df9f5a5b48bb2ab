"""Everything a user can cause, as one exception family.

The CLI prints a ``MedsimError`` as one sentence and exits 2; the HTTP layer maps it to
``http_status`` with a JSON body. Any other exception is a bug: it keeps its traceback
(CLI exit 1, HTTP 500, logged and never sent to a client).

Each class also derives from the builtin it replaces (``LookupError``, ``ValueError``,
``RuntimeError``), so ``except LookupError`` in callers written before this module
still catches what it used to.
"""

from __future__ import annotations


class MedsimError(Exception):
    """A problem the user can fix; the message says how."""

    exit_code = 2
    http_status = 400


class BadArgument(MedsimError, ValueError):
    """A value that can never work (k = 0, an unknown index kind, epochs = 0)."""


class NotFound(MedsimError, LookupError):
    """No such model, image, index build or dataset."""

    http_status = 404


class DataMissing(MedsimError, RuntimeError):
    """A source file is not on disk and could not be fetched."""

    http_status = 404


class DataRefused(MedsimError, ValueError):
    """Input exists but is not acceptable (wrong md5, bad structure, unreadable image);
    nothing was written."""

    http_status = 422


class Unreadable(DataRefused):
    """An image that cannot be used, with the reason. Raised without a name by the image
    readers (an ingest report names the file beside the reason); ``named`` puts the name
    in front for a person's own query."""

    def __init__(self, reason: str, name: str | None = None):
        self.reason = reason
        super().__init__(f"{name}: {reason}" if name else reason)

    def named(self, name: str) -> Unreadable:
        return Unreadable(self.reason, name)


class TooLarge(DataRefused):
    """An upload over the size limit; refused before it is read to the end."""

    http_status = 413


class StaleIndex(MedsimError, RuntimeError):
    """A FAISS index no longer describes the database (or another build's file)."""

    http_status = 409


class SchemaNotReady(MedsimError, RuntimeError):
    """The database is not at the schema revision this medsim needs."""

    http_status = 503


class DatabaseUnavailable(MedsimError, RuntimeError):
    """The database cannot be reached."""

    http_status = 503


class PacsUnavailable(MedsimError, RuntimeError):
    """The PACS cannot be reached (refused, reset, timed out again and again, or it asks
    for credentials medsim was not given). A sync stops; what it committed stays."""

    http_status = 502


class Unauthorized(MedsimError, PermissionError):
    """No token, or one that is not (or no longer) valid. ``token_id``: the token the
    request named, for the per-token limit on failed attempts."""

    http_status = 401

    def __init__(self, message: str, token_id: int | None = None):
        super().__init__(message)
        self.token_id = token_id


class Forbidden(MedsimError, PermissionError):
    """A valid token without the scope or the dataset grant this needs."""

    http_status = 403


class TooManyRequests(MedsimError, RuntimeError):
    """Too many failed attempts from one address (or one address with one token id); wait
    and retry. A request whose token is valid is never refused with it."""

    http_status = 429


class Busy(MedsimError, RuntimeError):
    """A lock another session holds past the bounded wait; the sentence names that session."""

    http_status = 409
