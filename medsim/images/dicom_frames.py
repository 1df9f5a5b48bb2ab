"""How many frames a DICOM object holds, bounded before anything is allocated for them.

A 2.3 KB file claiming NumberOfFrames = 1,000,000 made ingest-folder list a million
entries (1.5 GB after 30 s, never ending, its report left 'running') and a sync list a
million instances it never settled (issue 34); the query paths refused it only because
pydicom compares the pixel data's length first. Every reader now asks here, from the
header alone: a count that is a whole number, at most MAX_FRAMES, at most FILE_FACTOR x
MEDSIM_MAX_IMAGE_PIXELS in all (each frame alone is held to MEDSIM_MAX_IMAGE_PIXELS by
dicom.refusal), and no more than the file's bytes could hold; then, with the pixel data in
hand and before pydicom decodes or allocates anything, no more than it does hold.
pydicom's own reading of NumberOfFrames is kept (0 is one frame; a negative count refused).
"""

from __future__ import annotations

import io

from medsim.errors import Unreadable

# A file's frames are bounded from its header before anything is allocated for them: a 2.3 KB
# file claiming 1,000,000 frames listed a million entries and never ended (issue 34). Each
# frame is held to MEDSIM_MAX_IMAGE_PIXELS by refusal(); these bound the file.
MAX_FRAMES = 10_000  # a file: cine loops, enhanced CT/MR and tomosynthesis run to a few thousand
# all of a file's frames together, in MEDSIM_MAX_IMAGE_PIXELS (1 G pixels by default: a 2,000-frame
# 800 x 600 ultrasound cine). Frames are decoded and shrunk one at a time, so this bounds time.
FILE_FACTOR = 25
FRAGMENT_MIN = 8  # bytes: an encapsulated fragment's item header, with nothing in it


def frame_count(ds) -> int:
    """NumberOfFrames as a count: absent (or empty) is one frame, and so is 0, as pydicom
    reads it; anything but a whole number >= 0 is Unreadable, named. A file of -3 frames
    was listed as no entries at all and dropped without a word."""
    try:
        raw = ds.get("NumberOfFrames")
        text = "" if raw is None else str(raw).strip()
        if not text:
            return 1
        n = int(text)
    except (ValueError, TypeError, OverflowError):
        raise Unreadable(f"NumberOfFrames {str(raw)[:40]!r} is not a number of frames: refused") from None
    if n < 0:
        raise Unreadable(f"NumberOfFrames {n} is not a number of frames (DICOM requires 1 or more): refused")
    return max(n, 1)


def frame_refusal(ds, max_pixels: int, available: int | None = None) -> str | None:
    """Why a header's frames refuse its object before anything is read or allocated for them,
    or None: too many frames, too many pixels in all, or (given ``available``, the bytes of
    the whole file) more frames than the file could hold: native frames need their bytes,
    compressed ones at least a fragment each (PS3.5 A.4: a fragment never holds two frames).
    A single frame too short is left to the decoder, which names what it misses."""
    try:
        n = frame_count(ds)
    except Unreadable as err:
        return str(err)
    h, w = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if n > MAX_FRAMES:
        return f"it claims {n:,} frames, over the limit of {MAX_FRAMES:,} for one file: refused before reading them"
    if n * h * w > FILE_FACTOR * max_pixels:
        return (f"{n:,} frames of {w} x {h} = {n * h * w:,} pixels is over the limit of {FILE_FACTOR * max_pixels:,} "
                f"for one file ({FILE_FACTOR} x MEDSIM_MAX_IMAGE_PIXELS): refused before reading them")
    if available is None or n == 1:
        return None
    if _encapsulated(ds):
        if n * FRAGMENT_MIN > available:
            return (f"it claims {n:,} compressed frames, but the whole file is {available:,} bytes (a frame needs a "
                    f"fragment of at least {FRAGMENT_MIN}): refused before reading them")
        return None
    need = _native_bytes(ds, n)
    if need is not None and need > available:
        return (f"it claims {n:,} frames of {w} x {h} ({need:,} bytes of pixel data), but the whole file is "
                f"{available:,} bytes: refused before reading them")
    return None


def data_refusal(ds, n: int) -> str | None:
    """Why a data set's pixel data cannot hold its ``n`` frames, or None: checked before
    pydicom decodes (or allocates) anything. Native frames need their bytes; compressed
    frames a fragment each."""
    data = ds.get("PixelData") if "PixelData" in ds else None
    if not isinstance(data, bytes | bytearray):
        return None  # no pixel data (or float pixel data): the decoder names it
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    name = f"{syntax.name} ({syntax})" if syntax else "an unknown transfer syntax"
    if _encapsulated(ds):
        from pydicom.encaps import parse_basic_offsets, parse_fragments

        try:
            buffer = io.BytesIO(data)
            parse_basic_offsets(buffer)  # the offset table is an item too, not a fragment
            fragments = parse_fragments(buffer)[0]
        except (ValueError, TypeError, EOFError):
            return None  # malformed items: the decoder says so in its own words
        if n > fragments:
            return (f"cannot decode its pixels ({name}): it claims {n:,} frames but its pixel data holds "
                    f"{fragments:,} fragment(s), and a fragment never holds two frames")
        return None
    need = _native_bytes(ds, n)
    if need is not None and need > len(data):
        return (f"cannot decode its pixels ({name}): {n:,} frame(s) of {ds.get('Columns')} x {ds.get('Rows')} need "
                f"{need:,} bytes, its pixel data holds {len(data):,}")
    return None


def _encapsulated(ds) -> bool:
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return bool(syntax) and syntax.is_encapsulated


def _native_bytes(ds, n: int) -> int | None:
    """The bytes n native frames take, as pydicom expects them, or None when the header
    does not say (the decoder will)."""
    try:
        h, w = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
        samples, bits = int(ds.get("SamplesPerPixel") or 1), int(ds.get("BitsAllocated") or 0)
    except (ValueError, TypeError):
        return None
    if not bits:
        return None
    if bits == 1:  # packed, frames one after another
        return (n * h * w * samples + 7) // 8
    need = n * h * w * samples * ((bits + 7) // 8)
    if str(ds.get("PhotometricInterpretation", "")).strip() == "YBR_FULL_422":
        need = need // 3 * 2  # two chroma samples for every two pixels
    return need
