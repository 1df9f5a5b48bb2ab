"""A folder of PNG/JPEG/TIFF/BMP, DICOM files or NIfTI volumes, labelled one of three ways.

- ImageFolder layout (torchvision's convention): PATH/<label>/<file>; deeper folders
  belong to their top-level label.
- A manifest CSV: path,label[,split][,patient_id][,study_id][,any other column]. Paths
  are relative to the manifest's folder; several labels are separated by ';'
  (multi-label); other columns become the image's JSON metadata.
- For DICOM files, a tag (--label-tag BodyPartExamined, say): its value is the label.

Pixels are kept as decoded: 8-bit grey or RGB, and 16-bit grey stays 16-bit (lossless).
An image larger than max_side on its longest side is shrunk to it (aspect kept), and its
original size is recorded.

The archive's folder is a boundary (sources/boundary.py): nothing outside it is opened.
"""

from __future__ import annotations

import csv
import hashlib
import os
from functools import partial
from pathlib import Path

from medsim import images, settings
from medsim.errors import DataRefused, Unreadable
from medsim.images import nifti
from medsim.sources import boundary, dicom, ledger
from medsim.sources.base import SPLITS, Entry, Loaded, Problem

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}  # and DICOM, and NIfTI volumes
MANIFEST_COLUMNS = ("path", "label", "split", "patient_id", "study_id")
DEFAULT_MAX_SIDE = 1024
OUTSIDE = boundary.OUTSIDE


class FolderSource:
    kind = "folder"
    ledger = True  # files settled by an ingest are skipped by the next, unless changed (ledger.py)

    def __init__(self, root, manifest=None, max_side: int | None = None, label_tag: str | None = None,
                 follow_links: bool = False):
        self.root = Path(root)
        self.manifest = Path(manifest) if manifest else None
        # None: the dataset's own (a re-run), else DEFAULT_MAX_SIDE for a new one
        self.max_side_given = max_side is not None
        self.max_side = max_side if max_side is not None else DEFAULT_MAX_SIDE
        self.label_tag = label_tag  # DICOM files only: the tag whose value is the label
        self.follow_links = follow_links
        if self.max_side < 8:
            raise DataRefused(f"--max-side {self.max_side} is too small (at least 8)")
        if not self.root.is_dir():
            raise DataRefused(f"{self.root}: not a folder")
        if self.manifest is not None and not self.manifest.is_file():
            raise DataRefused(f"{self.manifest}: no such manifest file")

    def describe(self) -> str:
        return str(self.manifest or self.root)

    def base(self) -> Path:
        """The folder the source's paths are relative to, and may not leave."""
        return self.manifest.parent if self.manifest else self.root

    # -- listing --------------------------------------------------------------------
    def entries(self) -> tuple[list[Entry], list[tuple[str, str]]]:
        """-> (entries, problems found while listing: (path, reason))."""
        self.n_dicom = self.n_other = 0
        self._files = self._refused = None  # list the folder afresh: a re-run must see what changed
        found, problems = self._from_manifest() if self.manifest else self._from_folders()
        if self.n_dicom and not self.n_other:
            self.kind = "dicom"
        return found, problems

    def _expand(self, path: Path, entry: Entry) -> list[Entry]:
        """A listed file -> its entries: DICOM files are read (header only) for their frames,
        patient, study and kept tags; the manifest's columns take precedence."""
        entry.file = entry.path
        if nifti.is_nifti(path):
            if self.label_tag:
                raise Problem(f"not a DICOM file (--label-tag {self.label_tag} labels DICOM files only)")
            self.n_other += 1
            return nifti_entries(path, entry)
        if not dicom.is_dicom(path):
            if self.label_tag:
                raise Problem(f"not a DICOM file (--label-tag {self.label_tag} labels DICOM files only)")
            self.n_other += 1
            return [entry]
        self.n_dicom += 1
        frames = dicom.entries(path, entry.path, entry.labels or None, None if entry.labels else self.label_tag)
        for f in frames:
            f.file = entry.path
            f.split = entry.split
            f.patient_id = entry.patient_id or f.patient_id
            f.study_id = entry.study_id or f.study_id
            f.metadata = {**f.metadata, **entry.metadata}
        return frames

    def files(self) -> list[tuple[Path, int]]:
        """Every non-hidden regular file under the root with its size, sorted; links out of
        the root and what is not a regular file are set aside with the reason (_refused)."""
        if getattr(self, "_files", None) is None:
            self._files, self._refused = boundary.walk(self.root, self.follow_links)
        return self._files

    def inside(self, rel: str) -> tuple[Path | None, str | None]:
        return boundary.inside(self.base(), rel, self.follow_links)

    def _from_folders(self):
        entries, problems = [], []
        self.files()
        problems += self._refused
        for rel, _size in self.files():
            p = self.root / rel
            if p.suffix.lower() not in IMAGE_SUFFIXES and not dicom.is_dicom(p) and not nifti.is_nifti(p):
                problems.append((str(rel), f"not an image file (suffix {p.suffix or 'none'})"))
            elif len(rel.parts) < 2 and not self.label_tag:
                problems.append((str(rel), "not inside a label folder (PATH/<label>/<file>)"))
            else:
                try:
                    entries += self._expand(p, Entry(str(rel), () if self.label_tag else (rel.parts[0],)))
                except Unreadable as err:
                    problems.append((str(rel), str(err)))
        if not entries and not problems:
            raise DataRefused(f"{self.root}: no image files found")
        return entries, problems

    def _from_manifest(self):
        entries, problems = [], []
        with open(self.manifest, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            cols = [c.strip() for c in reader.fieldnames or []]
            missing = [c for c in ("path", "label") if c not in cols]
            if missing:
                raise DataRefused(f"{self.manifest}: the manifest needs the columns path and label "
                                  f"(missing: {', '.join(missing)}; found: {', '.join(cols) or 'none'})")
            for line, row in enumerate(reader, start=2):
                row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
                where = row.get("path") or f"{self.manifest.name} line {line}"
                labels = tuple(x.strip() for x in row.get("label", "").split(";") if x.strip())
                split = row.get("split") or None
                if not row.get("path") or not labels:
                    problems.append((where, f"manifest line {line} has no path or no label"))
                elif split is not None and split not in SPLITS:
                    problems.append((where, f"manifest line {line}: split {split!r} is not one of "
                                            f"{', '.join(SPLITS)}"))
                else:
                    meta = {k: v for k, v in row.items() if k not in MANIFEST_COLUMNS and v != ""}
                    path, why = self.inside(row["path"])
                    if why:
                        problems.append((row["path"], why))
                        continue
                    rel = os.path.relpath(path, self.base())
                    e = Entry(rel, labels, split, row.get("patient_id") or None, row.get("study_id") or None, meta)
                    try:
                        entries += self._expand(path, e)
                    except Unreadable as err:
                        problems.append((rel, str(err)))
        return entries, problems

    def fingerprint(self) -> str:
        """What the dataset row records as its source digest: the manifest's bytes, or the
        sorted listing (paths and sizes) of the folder."""
        h = hashlib.sha256()
        if self.manifest:
            h.update(self.manifest.read_bytes())
        else:
            for rel, size in self.files():
                h.update(f"{rel}:{size}\n".encode())
        return h.hexdigest()

    # -- pixels ---------------------------------------------------------------------
    def loader(self):
        """[entries of one file] -> [Loaded] (or Unreadable): small enough to send to worker
        processes. The frames of a DICOM file come together so the file is decoded once."""
        return partial(load_file, self.base(), self.max_side)

    def load(self, entry: Entry) -> Loaded:
        return self.loader()([entry])[0]


def load_file(base: Path, max_side: int, group: list[Entry]) -> list[Loaded]:
    """The file read once: its bytes are hashed for the ledger and decoded."""
    path = base / (group[0].file or group[0].path)
    data, stamp = ledger.read_stamped(path)
    source = data if data is not None else path
    if nifti.is_nifti(path):  # nibabel reads slices from the file itself (lazily, gzip or not)
        slices = nifti.read_slices(path, [e.frame for e in group], settings.get().max_image_pixels)
        out = [Loaded.shrunk(x, max_side) for x in slices]
    elif dicom.is_dicom(path):
        out = dicom.load_entries(source, group, max_side)
    else:
        out = [load_image(source, max_side)]
    for x in out:
        x.stamp = stamp
    return out


def nifti_entries(path: Path, entry: Entry) -> list[Entry]:
    """One entry per axial slice, each with the volume's canonical affine (images/nifti.py)."""
    h = nifti.header(path, settings.get().max_image_pixels)
    meta = {"format": "NIfTI", "affine": h["affine"], "voxel_mm": h["voxel_mm"]}
    return [Entry(f"{entry.path}#slice{k}", entry.labels, entry.split, entry.patient_id, entry.study_id,
                  {**meta, "slice": k, **entry.metadata}, frame=k, file=entry.path) for k in range(h["slices"])]


def load_image(path: Path | bytes, max_side: int) -> Loaded:
    """One image file (or its bytes) -> pixels as they will be stored, or Unreadable; what
    the decoder printed, if anything, is its note (the file's report line)."""
    notes: list[str] = []
    out = Loaded.shrunk(images.read(path, notes=notes), max_side)
    out.note = "; ".join(notes) or None
    return out
