"""A PACS listing as an archive source: QIDO-RS answers become entries (one per frame), and
their pixels come by WADO-RS, instance by instance or a small series at once, rendered
through the same DICOM path as `ingest-folder` (sources/dicom.py)."""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass
from functools import partial

from medsim import settings
from medsim.errors import DataRefused, Unreadable
from medsim.images import dicom as render
from medsim.sources import dicom as dicom_source
from medsim.sources.base import Entry
from medsim.sources.pacs_client import FetchFailed, Server, TooBig

DEFAULT_MAX_SIDE = 256
# A series is fetched in one WADO-RS request when every instance it lists is wanted and it
# is small enough to hold at once (a third of the time per instance of one request each);
# otherwise instance by instance.
SERIES_MAX = 64
SERIES_MAX_PIXELS = 32_000_000

@dataclass
class Item:
    """One frame of one instance as QIDO listed it."""

    study: str
    series: str
    sop: str
    frame: int | None
    patient_id: str | None
    label: str | None
    meta: dict  # the kept tags (sources/dicom.py), UIDs in clear until the ingest keys them
    pixels: int = 0  # of the whole instance, all frames: what fetching its series costs
    refused: str | None = None  # refused unfetched (a non-image SOP class, too many pixels)


class PacsSource:
    """The archive-source interface (sources/base.py) over a QIDO listing."""

    kind = "pacs"

    def __init__(self, server: Server, items: list[Item], label_tag: str, max_side: int | None,
                 listed_series: dict | None = None):
        self.server, self.items, self.label_tag = server, items, label_tag
        self.listed_series = listed_series or {}  # (study, series) -> instances the PACS listed
        self.max_side_given = max_side is not None
        self.max_side = max_side if max_side is not None else DEFAULT_MAX_SIDE
        if self.max_side < 8:
            raise DataRefused(f"--max-side {self.max_side} is too small (at least 8)")

    def describe(self) -> str:
        return self.server.url

    def base(self) -> str:
        return self.server.url

    def fingerprint(self) -> str:
        return "pacs:" + self.server.url

    def entries(self):
        out, problems = [], []
        whole = self._whole_series()
        for it in self.items:
            name = it.sop if it.frame is None else f"{it.sop}#frame{it.frame}"
            if not it.label:
                problems.append((name, f"no {self.label_tag} in the PACS's answer to label it with"))
                continue
            series = (it.study, it.series) in whole and not it.refused
            out.append(Entry(name, (it.label,), None, it.patient_id, it.study, dict(it.meta), frame=it.frame,
                             file=f"{it.study}/{it.series}" + ("" if series else f"/{it.sop}")))
        out.sort(key=lambda e: (e.file, e.metadata["SOPInstanceUID"], e.frame or 0))  # a fetch's entries together
        self.refused = {f"{it.study}/{it.series}/{it.sop}": it.refused for it in self.items if it.refused}
        return out, problems

    def _whole_series(self) -> set:
        sops, pixels = {}, {}
        for it in self.items:
            if not it.refused and it.sop not in sops.setdefault((it.study, it.series), set()):
                sops[(it.study, it.series)].add(it.sop)
                pixels[(it.study, it.series)] = pixels.get((it.study, it.series), 0) + it.pixels
        return {k for k, v in sops.items() if 1 < len(v) <= SERIES_MAX and len(v) == self.listed_series.get(k)
                and pixels[k] <= SERIES_MAX_PIXELS}

    def loader(self):
        return partial(fetch_instance, self.server, self.max_side, self.refused)


def fetch_instance(server: Server, max_side: int, refused: dict, group: list[Entry]) -> list:
    """The frames of one instance, or of every instance of a small series: fetched once
    (WADO-RS), rendered as ingest-folder renders a file. Refused unfetched when the listing
    already said why. -> one Loaded or Unreadable per entry."""
    key = group[0].file
    if refused.get(key):
        raise dicom_source.Problem(refused[key])
    parts = key.split("/")
    if len(parts) == 3:
        got = {parts[2]: server.retrieve(*parts)}
    else:
        try:
            got = server.retrieve_series(*parts)
        except TooBig:
            got = {}  # too big at once: instance by instance, each checked on its own
    out = []
    for sop, entries in itertools.groupby(group, key=lambda e: e.metadata["SOPInstanceUID"]):
        entries = list(entries)
        ds = got.get(sop)
        try:
            if ds is None and len(parts) == 2:  # a series' answer came back short: ask for this one
                ds = server.retrieve(*parts, sop)
            if ds is None or str(ds.get("SOPInstanceUID", "")) != sop:
                raise FetchFailed("the PACS's answer did not hold this instance")
            out += dicom_source.load_entries(ds, entries, max_side)
        except Unreadable as err:
            out += [err] * len(entries)
    return out


def listed(raw: list[dict], label_tag: str) -> list[Item]:
    """QIDO's DICOM JSON -> one Item per frame."""
    from pydicom import Dataset

    limit = settings.get().max_image_pixels
    out = []
    for obj in raw:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pydicom warns of every malformed date a PACS holds
                ds = Dataset.from_json(obj)
            study, series, sop = (str(ds[t].value) for t in ("StudyInstanceUID", "SeriesInstanceUID",
                                                               "SOPInstanceUID"))
        except (KeyError, ValueError, TypeError):
            continue  # an answer without its UIDs cannot be fetched or kept: nothing to settle
        # the same sentences a file gets; the frame count bounded before an item is made for
        # each (a listing of 1,000,000 frames never finished), a refused instance one item
        refused = render.refusal(ds, limit, size_required=False) or render.frame_refusal(ds, limit)
        frames = render.frame_count(ds) if not refused else 1
        meta = {t: str(ds.get(t)) for t in dicom_source.KEPT_TAGS if ds.get(t) not in (None, "")}
        meta.update(StudyInstanceUID=study, SeriesInstanceUID=series, SOPInstanceUID=sop)
        label = str(ds.get(label_tag, "") or "").strip() or None
        pid = str(ds.get("PatientID", "") or "").strip() or None
        for f in range(frames):
            pixels = int(ds.get("Rows") or 0) * int(ds.get("Columns") or 0) * frames
            out.append(Item(study, series, sop, f if frames > 1 else None, pid, label, meta, pixels, refused))
    return out
