"""What decoders say, kept out of the terminal and handed to medsim's own report.

The C libraries under the decoders write straight to file descriptor 2: OpenJPEG inside
pylibjpeg-openjpeg ("Invalid number of tiles ..."), the libjpeg that GDCM bundles
("Corrupt JPEG data: 3 extraneous bytes before marker"), GDCM's own trace. Python's
``warnings`` and ``logging`` never see those lines, and neither pylibjpeg nor GDCM's wheel
offers a hook for them, so ``captured()`` points fd 2 at a temporary file for the length of
one decode and gives back what landed there: an ingest puts it on that file's report line,
a failed query puts it into its one sentence. (pydicom's own messages are Python warnings
and are filtered at each call; it logs to a logger with a NullHandler.)

fd 2 belongs to the whole process, so a lock serialises the swap: two threads swapping it
at once (the service decodes uploads in a thread pool) could leave it pointing at a closed
file. While one decode runs, a line another thread writes to stderr lands in that decode's
capture; decodes take milliseconds, and such lines are not lost: ``captured`` logs what it
caught at debug level (medsim.images) as well.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading

_LOCK = threading.RLock()
_depth = 0  # captures open in the thread holding _LOCK
KEEP = 600  # characters of what a decoder said that a report line keeps
log = logging.getLogger("medsim.images")


class Said:
    """What was written to fd 2 during a ``captured()`` block: one line, or ''."""

    text = ""

    def __bool__(self) -> bool:
        return bool(self.text)


@contextlib.contextmanager
def captured():
    """Run the block with fd 2 redirected to a temporary file -> Said (filled on exit).
    Re-entrant: an inner block leaves the capture to the outer one."""
    global _depth
    said = Said()
    with _LOCK:
        if _depth:
            yield said
            return
        _flush()
        try:
            saved = os.dup(2)
        except OSError:  # no fd 2 at all (a daemon closed it): nothing can reach a terminal
            yield said
            return
        try:
            with tempfile.TemporaryFile() as tmp:
                os.dup2(tmp.fileno(), 2)
                _depth = 1
                try:
                    yield said
                finally:  # a decoder that failed said the most: read it on the way out too
                    _depth = 0
                    _flush()
                    os.dup2(saved, 2)
                    tmp.seek(0)
                    said.text = one_line(tmp.read(64 * 1024).decode("utf-8", "replace"))
                    if said:
                        log.debug("a decoder said: %s", said.text)
        finally:
            os.close(saved)


def one_line(text: str) -> str:
    out = " / ".join(line.strip() for line in text.splitlines() if line.strip())
    return out if len(out) <= KEEP else out[: KEEP - 3] + "..."


def _flush() -> None:
    # Python's own buffered stderr first, so its lines land on the side they were written
    with contextlib.suppress(Exception):
        sys.stderr.flush()
