"""No DICOM UID in a log: a UID in a log file is enough to fetch the study back from the
PACS (a deleted patient's included), and logs are read, shipped and kept by more people
than the database. dicomweb-client names every study, series and instance UID it asks
for at INFO, urllib3 every URL (which holds them) at DEBUG, and a failed request's
traceback can hold one too: HideUids, put on those loggers, writes each UID as its keyed
hash instead."""

from __future__ import annotations

import logging
import re

from medsim.errors import BadArgument

# A DICOM UID as it appears in text: a root of 0, 1 or 2 and at least three more numeric
# components (so "HTTP/1.1", versions and IPv4 addresses do not match).
UID_IN_TEXT = re.compile(r"(?<![\d.])[0-2](?:\.\d+){3,}(?![\d.])")
CHATTY_LOGGERS = ("dicomweb_client.web", "dicomweb_client.api", "urllib3.connectionpool")


class HideUids(logging.Filter):
    """Writes each UID in a log record (its message and its traceback) as its keyed hash,
    the form medsim stores (images.study_id, `medsim keys hash --uid`): the same UID gives
    the same hash, so a log still shows what repeats, and only the key's holder can
    recompute it. With no key configured: "<a UID>"."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        hidden = UID_IN_TEXT.sub(_keyed, text)
        if hidden != text:
            record.msg, record.args = hidden, None
        if record.exc_info and not record.exc_text:
            record.exc_text = UID_IN_TEXT.sub(_keyed, logging.Formatter().formatException(record.exc_info))
        return True


def _keyed(m: re.Match) -> str:
    from medsim.sources import keys

    try:
        ring = keys.configured("a UID in the log")
    except BadArgument:
        return "<a UID>"
    return "uid:" + ring.uid(m.group(0))


def hide_uids(*loggers: str) -> None:
    """Puts HideUids on these loggers, once each (a logger's filters see only the records
    made on it, not those its children pass up)."""
    for name in loggers:
        logger = logging.getLogger(name)
        if not any(isinstance(f, HideUids) for f in logger.filters):
            logger.addFilter(HideUids())
