"""Talking to a PACS: DICOMweb through dicomweb-client (QIDO-RS to find instances,
WADO-RS to fetch them), and, when the server is an Orthanc, its REST change log.

The HTTP is dicomweb-client's (the MGH/IDC client); this module adds what a sync needs on
top: credentials from the settings (never from the URL, never stored), a timeout on every
request (requests has none by default, and a PACS that stops answering would hang the
sync), a few retries of what is worth retrying, and one sentence per failure:
- the server cannot be reached, refuses our credentials, or times out again and again:
  PacsUnavailable, and the sync stops (what it committed stays; the next run resumes);
- one instance answers 5xx, times out or sends something that is not DICOM: FetchFailed
  (an Unreadable), reported for that instance, and the sync goes on. It is not settled:
  the next sync tries again, and the cursor does not move until it has;
- one instance that is gone (404) or over MEDSIM_PACS_MAX_BYTES: Gone / TooBig, refused for
  good (settled with the reason), so that it cannot hold the cursor back for ever.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import requests
from pydicom.errors import InvalidDicomError
from requests.adapters import HTTPAdapter

from medsim import settings
from medsim.errors import BadArgument, PacsUnavailable, Unreadable
from medsim.sources.pacs_answers import INSTANCE_UIDS, change_log_fault, dicom_json_fault, shape
from medsim.sources.pacs_log import CHATTY_LOGGERS, hide_uids

RETRIES = 3
# Instances as the PACS stores them, whatever their transfer syntax: medsim decodes JPEG,
# JPEG-LS, JPEG 2000 and RLE itself. Asking for the default (Explicit VR Little Endian) made
# Orthanc transcode, and a series whose transcoding failed came back short.
AS_STORED = (("application/dicom", "*"),)
PAGE = 1000  # QIDO results per request (Orthanc answers at most what it is configured for)
# What QIDO is asked for besides the UIDs: the patient (keyed at once), what filters and
# labels need, and enough to refuse a non-image object or an oversized one unfetched.
FIELDS = ("PatientID", "StudyDate", "StudyTime", "Modality", "BodyPartExamined", "ViewPosition", "SOPClassUID",
          "NumberOfFrames", "Rows", "Columns")


# dicomweb-client and urllib3 log the UIDs they ask for: the log gets keyed hashes instead
hide_uids(*CHATTY_LOGGERS)


class Malformed(PacsUnavailable):
    """The PACS answered, but not in the shape DICOMweb (or Orthanc's REST API) promises:
    the sync stops in a sentence naming the server, never a traceback, and nothing is
    taken for an empty PACS."""


class FetchFailed(Unreadable):
    """One instance could not be fetched this time (5xx, gone, timed out): not settled."""


class Gone(Unreadable):
    """The PACS no longer has the instance (404): refused for good; --prune forgets it."""


class TooBig(Unreadable):
    """An answer over MEDSIM_PACS_MAX_BYTES, refused by its Content-Length before its body is
    read, or as soon as the bytes read pass the limit when it has none (Orthanc streams a
    series without one). A series is then asked for instance by instance."""


def _refuse_big(limit: int):
    def too_big(size: int, known: bool) -> TooBig:
        if known:
            return TooBig(f"the PACS's answer is {size:,} bytes, over the limit of {limit:,} (MEDSIM_PACS_MAX_BYTES)")
        return TooBig(f"the PACS's answer passed the limit of {limit:,} bytes (MEDSIM_PACS_MAX_BYTES)")

    def hook(response, *args, **kwargs):
        size = response.headers.get("Content-Length")
        if size and size.isascii() and size.isdigit():
            if int(size) > limit:
                response.close()
                raise too_big(int(size), True)
            return response
        raw, seen = response.raw, [0]
        read = raw.read

        def counted(*a, **k):  # requests reads the body through raw.read (urllib3's stream)
            data = read(*a, **k)
            seen[0] += len(data or b"")
            if seen[0] > limit:
                response.close()
                raise too_big(seen[0], False)
            return data

        raw.read = counted
        return response

    return hook


class _Timeout(HTTPAdapter):
    def __init__(self, timeout: float):
        super().__init__(max_retries=0, pool_maxsize=8)
        self.timeout = timeout

    def send(self, request, **kwargs):
        kwargs["timeout"] = kwargs.get("timeout") or self.timeout
        return super().send(request, **kwargs)


@dataclass
class Server:
    url: str  # the DICOMweb root, e.g. http://pacs:8042/dicom-web
    timeout: float = 30.0
    _session: requests.Session | None = field(default=None, repr=False)
    _client: object = field(default=None, repr=False)

    @classmethod
    def at(cls, url: str) -> Server:
        parts = urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BadArgument(f"{url!r} is not a DICOMweb URL (http://host:port/dicom-web, say)")
        if parts.username or parts.password:
            raise BadArgument("put the PACS credentials in MEDSIM_PACS_USER and MEDSIM_PACS_PASSWORD (or "
                              "MEDSIM_PACS_TOKEN), not in the URL: medsim stores the URL")
        return cls(url.strip().rstrip("/"), float(settings.get().pacs_timeout))

    @property
    def session(self) -> requests.Session:
        if self._session is None:
            s, conf = requests.Session(), settings.get()
            if conf.pacs_token:
                s.headers["Authorization"] = f"Bearer {conf.pacs_token}"
            elif conf.pacs_user:
                s.auth = (conf.pacs_user, conf.pacs_password or "")
            adapter = _Timeout(self.timeout)
            s.mount("http://", adapter)
            s.mount("https://", adapter)
            # requests runs response hooks before it reads a body it was not asked to stream
            s.hooks["response"].append(_refuse_big(conf.pacs_max_bytes))
            self._session = s
        return self._session

    @property
    def client(self):
        if self._client is None:
            from dicomweb_client.api import DICOMwebClient

            self._client = DICOMwebClient(self.url, session=self.session, timeout=self.timeout)
            self._client.set_http_retry_params(retry=False)  # ours (call) knows which failures end the sync
        return self._client

    def __getstate__(self):  # sent to worker processes: each opens its own session
        return {"url": self.url, "timeout": self.timeout, "_session": None, "_client": None}

    # -- DICOMweb -----------------------------------------------------------------
    def instances(self, filters: dict, fields: tuple, limit: int | None = None) -> list[dict]:
        """Every instance matching QIDO filters, in pages: DICOM JSON objects, each checked
        to be one and to carry its three UIDs (Malformed otherwise)."""
        found: list[dict] = []
        client = self.client
        while limit is None or len(found) < limit:
            page = PAGE if limit is None else min(PAGE, limit - len(found))
            got = self.call("searching instances", client.search_for_instances, search_filters=filters,
                             fields=list(fields), offset=len(found), limit=page)
            found += checked(self, got, "searching instances", INSTANCE_UIDS)
            if len(got) < page:
                break
        return found

    def studies(self, filters: dict) -> list[str]:
        """The StudyInstanceUIDs of the studies matching QIDO filters."""
        client, out = self.client, []
        while True:
            got = self.call("searching studies", client.search_for_studies, search_filters=filters,
                             fields=["StudyInstanceUID"], offset=len(out), limit=PAGE)
            out += [g["0020000D"]["Value"][0] for g in checked(self, got, "searching studies", INSTANCE_UIDS[:1])]
            if len(got) < PAGE:
                return out

    def retrieve(self, study: str, series: str, sop: str):
        """One instance as a pydicom Dataset (WADO-RS), or FetchFailed / PacsUnavailable."""
        return self.call("fetching an instance", self.client.retrieve_instance, study, series, sop,
                         media_types=AS_STORED, one=True)

    def retrieve_series(self, study: str, series: str) -> dict:
        """Every instance of a series in one WADO-RS request (a third of the time per instance
        of fetching them one by one): SOPInstanceUID -> pydicom Dataset."""
        got = self.call("fetching a series", self.client.retrieve_series, study, series, media_types=AS_STORED,
                        one=True)
        return {str(ds.get("SOPInstanceUID", "")): ds for ds in got}

    def retrieve_bytes(self, study: str, series: str, sop: str) -> bytes:
        """One instance as a DICOM file's bytes (for the service's proxy of an original)."""
        import io

        ds = self.retrieve(study, series, sop)
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        return out.getvalue()

    def get_json(self, url: str, params: dict):
        r = self.session.get(url, params=params)
        r.raise_for_status()
        return r.json()

    # -- failures -----------------------------------------------------------------
    def call(self, what: str, fn, *args, one: bool = False, **kwargs):
        """fn(*args, **kwargs) with retries; one sentence for what is left. `one`: a single
        instance's failure is FetchFailed (the sync goes on); otherwise it stops the sync."""
        for attempt in range(RETRIES):
            try:
                return fn(*args, **kwargs)
            except Malformed:
                raise
            except (FetchFailed, TooBig, Gone) as err:  # already one sentence
                if one:
                    raise
                raise PacsUnavailable(f"the PACS at {self.url}, while {what}: {err}") from None
            except requests.HTTPError as err:
                status = err.response.status_code if err.response is not None else 0
                if status in (401, 403):
                    raise PacsUnavailable(f"the PACS at {self.url} refused our credentials ({status}) while "
                                          f"{what}: set MEDSIM_PACS_USER and MEDSIM_PACS_PASSWORD, or "
                                          f"MEDSIM_PACS_TOKEN") from None
                if status == 404 and one:
                    raise Gone("no longer in the PACS (404)") from None
                if status < 500 or attempt == RETRIES - 1:
                    if one:
                        raise FetchFailed(f"the PACS answered {status} while {what}") from None
                    query = f"{status} to a QIDO-RS query" if what.startswith("searching") else status
                    hint_ = hint(self.url) if status in (400, 404, 405) else ""
                    raise PacsUnavailable(f"the PACS at {self.url} answered {query} while {what}{hint_}") from None
            except requests.Timeout:
                if attempt == RETRIES - 1:
                    if one:
                        raise FetchFailed(f"the PACS did not answer within {self.timeout:g} s while {what} "
                                          f"({RETRIES} tries)") from None
                    raise PacsUnavailable(f"the PACS at {self.url} did not answer within {self.timeout:g} s "
                                          f"while {what} ({RETRIES} tries)") from None
            except requests.ConnectionError as err:
                if attempt == RETRIES - 1:
                    raise PacsUnavailable(f"the PACS at {self.url} cannot be reached while {what} "
                                          f"({_root_cause(err)})") from None
            except (ValueError, KeyError, EOFError, InvalidDicomError) as err:  # not what DICOMweb promises
                if one:
                    raise FetchFailed(f"a malformed answer while {what} ({type(err).__name__}: "
                                      f"{str(err)[:200]})") from None
                raise Malformed(f"the PACS at {self.url} sent a malformed answer while {what} "
                                f"({str(err)[:200]}){hint(self.url)}") from None
            time.sleep(0.2 * 2**attempt)
        raise AssertionError("unreachable")


def checked(server: Server, got, what: str, needs: tuple) -> list[dict]:
    """A QIDO-RS answer in the DICOM JSON model, each object with the UIDs medsim reads
    (pacs_answers.py), or Malformed naming the server. dicomweb-client passes a lone object
    on as a list of one: `{}` arrives as [{}] and holds no UID (it was read as an empty PACS)."""
    why = dicom_json_fault(got, needs)
    if why:
        raise Malformed(f"the PACS at {server.url} sent a malformed answer while {what}: {why}{hint(server.url)}")
    return got


def hint(url: str) -> str:
    """What to try when a QIDO-RS query is refused, or answered in nonsense, by a URL that is
    not a DICOMweb root (a PACS's web page, its REST API)."""
    if urlsplit(url).path.rstrip("/").endswith("dicom-web"):
        return ""
    return "; is the URL the DICOMweb root (often ending in /dicom-web)?"


def _root_cause(err: Exception) -> str:
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    return f"{type(err).__name__}: {str(err)[:160]}"


def orthanc_study_id(patient_id: str, study_uid: str) -> str:
    """Orthanc's id of a study: SHA-1 of "PatientID|StudyInstanceUID" in five dashed groups
    (how Orthanc names resources; its explorer's links need it)."""
    h = hashlib.sha1(f"{patient_id}|{study_uid}".encode()).hexdigest()
    return "-".join(h[i: i + 8] for i in range(0, 40, 8))


# -- Orthanc: its REST API, beside DICOMweb, for the change log and its own ids ---------
def orthanc_root(server: Server) -> str | None:
    """The Orthanc REST root this DICOMweb URL belongs to, or None for another server."""
    root = server.url[: -len("/dicom-web")] if server.url.endswith("/dicom-web") else None
    if root is None:
        return None
    try:
        r = server.session.get(f"{root}/system")
        body = r.json() if r.ok else {}
    except (requests.RequestException, ValueError):
        return None
    return root if isinstance(body, dict) and "Version" in body and "ApiVersion" in body else None


def changes(server: Server, since: int) -> tuple[list[str], int]:
    """Orthanc's change log after `since`: (new instances' Orthanc ids, the last seq)."""
    root, ids, last = server.url[: -len("/dicom-web")], [], since
    while True:
        body = _change_log(server, server.call("reading changes", server.get_json, f"{root}/changes",
                                               {"since": last, "limit": 1000}))
        ids += [c["ID"] for c in body.get("Changes", []) if c.get("ChangeType") == "NewInstance"]
        last = int(body.get("Last", last))
        if body.get("Done", True) or not body.get("Changes"):
            return ids, last


def last_change(server: Server) -> int:
    root = server.url[: -len("/dicom-web")]
    return int(_change_log(server, server.call("reading changes", server.get_json, f"{root}/changes",
                                               {"last": ""})).get("Last", 0))


def _change_log(server: Server, body) -> dict:
    """Orthanc's /changes answer as its REST API documents it, or Malformed."""
    why = change_log_fault(body)
    if why:
        raise Malformed(f"the PACS at {server.url} sent a malformed answer while reading changes: {why}")
    return body


def orthanc_uids(server: Server, instance_id: str) -> tuple[str, str, str] | None:
    """(study, series, SOP instance UIDs) of an Orthanc instance id, None if it is gone."""
    root = server.url[: -len("/dicom-web")]
    try:
        tags = server.call("reading an instance", server.get_json, f"{root}/instances/{instance_id}/tags",
                           {"simplify": ""}, one=True)
    except (FetchFailed, Gone):
        return None
    if not isinstance(tags, dict):
        raise Malformed(f"the PACS at {server.url} sent a malformed answer while reading an instance: "
                        f"{shape(tags)} where Orthanc gives an object of its tags")
    try:
        return tags["StudyInstanceUID"], tags["SeriesInstanceUID"], tags["SOPInstanceUID"]
    except KeyError:
        return None
