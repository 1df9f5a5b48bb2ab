"""Pixels: the one place images are read, converted and resized.

Every path that turns an image into what the network sees goes through here: ingest
(folders, manifests, DICOM, MedMNIST), training and evaluation, the embedding worker,
search by file or upload (CLI and HTTP) and thumbnails. Nothing here imports anything
of medsim's above ``errors`` and ``settings``.

The rules, each in one place:

- **Stored form** (``convert.as_stored``): (H, W, C) with C in {1, 3}, uint8 or uint16,
  exactly as decoded (16-bit is kept lossless). Alpha is dropped; palettes become grey or
  RGB; 32-bit integer images must fit 16 bits; floating-point images are accepted only
  in 0..1 (stored as 16-bit, 1.0 -> 65535), anything else has no declared range and is
  refused.
- **Bit depth** (``convert.model_input``): a pixel's value is read against its
  container's full scale: 8-bit 255, 16-bit 65535. The model's 8-bit input is
  value * 255 / full scale, computed in floating point and rounded once, so an 8-bit
  image and its x257 16-bit copy give identical input, and 12-bit data in a 16-bit
  container stays as dark as its container says (a viewer without a window shows it so).
  DICOM is first rendered to display values the way a viewer does (``dicom``: Modality
  LUT, VOI LUT when the file has one, MONOCHROME1 inverted), spread over the 16-bit
  range (8-bit when the file stores 8 bits); that rendering is unchanged since revision
  0008, so archives ingested before keep matching their files.
- **Resizing** (``convert.resize``): one function, one filter: Lanczos (Pillow), which is
  antialiased when it shrinks. Ingest shrinks images over --max-side with it (8-bit in
  Pillow's own 8-bit path, 16-bit in 32-bit float, as before, so re-runs of an archive
  store the same bytes); the model's input is resized with it in floating point, after the
  bit-depth scaling and before the single rounding.
- **Untrusted input** (``files.read``): the format is sniffed from the content, the pixel
  count is checked from the header before any pixel is decoded (``settings``'
  max_image_pixels), multi-page files are refused, and every failure is one
  ``Unreadable`` sentence.
"""

from medsim.errors import Unreadable
from medsim.images.convert import as_stored, model_input, resize, shrink, to_display
from medsim.images.files import palette_is_grey, read, read_dicom_frames, sniff
from medsim.images.stored import StoredRow, from_bytes

__all__ = ["StoredRow", "Unreadable", "as_stored", "from_bytes", "model_input", "palette_is_grey", "read",
           "read_dicom_frames", "resize",
           "shrink", "sniff", "to_display"]
