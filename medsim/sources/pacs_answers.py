"""What a PACS's answers must look like before medsim reads anything from them.

A DICOMweb server that answered `[{"foo": "bar"}, 17, null]` or `"hello"` to QIDO-RS
crashed a sync with an AttributeError, and one that answered a JSON object was taken for
an empty PACS (issue 34). Each answer is held to its shape first (QIDO-RS: the DICOM JSON
model of PS3.18 F.2; Orthanc's change log: its REST API's object), and what is wrong is
said in words that pacs_client puts into one sentence naming the server.
"""

from __future__ import annotations

import re

INSTANCE_UIDS = ("0020000D", "0020000E", "00080018")  # Study, Series, SOP Instance UID: what a listing reads
TAG = re.compile(r"[0-9A-Fa-f]{8}")


def change_log_fault(body) -> str | None:
    """What is wrong with an answer of Orthanc's /changes, or None: an object with a list of
    change objects (each NewInstance with its ID) and an integer Last."""
    changes = body.get("Changes", []) if isinstance(body, dict) else None
    last = body.get("Last", 0) if isinstance(body, dict) else None
    ok = (isinstance(changes, list) and isinstance(last, int) and not isinstance(last, bool)
          and all(isinstance(c, dict) for c in changes)
          and all(isinstance(c.get("ID"), str) for c in changes if c.get("ChangeType") == "NewInstance"))
    if ok:
        return None
    return f"{shape(body)} where Orthanc's change log is an object with a list of changes and a sequence number"


def dicom_json_fault(got, needs: tuple = ()) -> str | None:
    """What is wrong with a QIDO-RS answer as DICOM JSON (PS3.18 F.2), or None: a list of
    objects, each key a tag, each value an object with its VR (and a list as its Value),
    each object with the tags in ``needs`` holding a text value."""
    if not isinstance(got, list):
        return f"{shape(got)} where QIDO-RS answers a list of DICOM JSON objects"
    for k, obj in enumerate(got, start=1):
        if not isinstance(obj, dict):
            return f"item {k} of the list is {shape(obj)}, not a DICOM JSON object"
        for tag, value in obj.items():
            if not (isinstance(tag, str) and TAG.fullmatch(tag)):
                return f"item {k} has {str(tag)[:40]!r}, which is not a DICOM tag (8 hexadecimal digits)"
            if not (isinstance(value, dict) and isinstance(value.get("vr"), str)
                    and isinstance(value.get("Value", []), list)):
                return f"item {k}'s attribute {tag} is {shape(value)}, not an object with its VR (and a list of values)"
        for tag in needs:
            v = (obj.get(tag) or {}).get("Value") or [None]
            if not (isinstance(v[0], str) and v[0].strip()):
                return f"item {k} holds no {UID_NAMES.get(tag, tag)} ({tag})"
    return None


UID_NAMES = {"0020000D": "StudyInstanceUID", "0020000E": "SeriesInstanceUID", "00080018": "SOPInstanceUID"}


def shape(x) -> str:
    """A JSON value named for a sentence: 'a JSON object', 'the number 17', 'null'."""
    if x is None:
        return "null"
    if isinstance(x, bool):
        return f"the JSON value {str(x).lower()}"
    if isinstance(x, int | float):
        return f"the number {x}"
    if isinstance(x, str):
        return f"the JSON string {x[:40]!r}"
    if isinstance(x, dict):
        return "a JSON object" if x else "an empty JSON object"
    if isinstance(x, list):
        return "a JSON list"
    return type(x).__name__
