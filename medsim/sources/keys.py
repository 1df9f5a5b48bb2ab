"""Pseudonyms: what could name a person is stored only as a keyed hash.

Patient ids, file paths (relative to the archive), study ids and DICOM UIDs go into the
database as HMAC-SHA256 values keyed with MEDSIM_PATIENT_KEY, never in clear. The key is
configuration and never written to the database; without it a stored hash cannot be
linked back, and with it an admin recomputes a hash from the source itself (`medsim keys
hash`). One database, one key chain: the database records a fingerprint of each key (an
HMAC of a fixed message) and refuses a different key in one sentence, so one patient can
never carry two hashes and escape a deletion.

Rotation (`medsim keys rotate`) cannot recompute hashes from ids it never kept, so it
chains: every stored value v becomes step(new_key, v), in one transaction, and from then on
a value is hashed through every key in order (MEDSIM_PATIENT_KEY_PREVIOUS holds the earlier
ones, oldest first, one per line). A leaked old key alone no longer matches anything.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from psycopg import sql

from medsim import settings
from medsim.errors import BadArgument
from medsim.queries import Q, scalar

MIN_KEY_LENGTH = 16
FINGERPRINT_MESSAGE = b"medsim pseudonym key fingerprint v1"


def fingerprint(key: str) -> str:
    return hmac.new(key.encode(), FINGERPRINT_MESSAGE, hashlib.sha256).hexdigest()[:16]


def _hmac(key: str, value: str) -> str:
    return hmac.new(key.encode(), value.encode(), hashlib.sha256).hexdigest()


def _as_uid(digest: str) -> str:
    """A DICOM UID under the 2.25 (UUID) root: PS3.15's "replace with an internally
    consistent UID" for Study, Series and SOP Instance UIDs."""
    return "2.25." + str(int(digest[:32], 16))


# kind -> (what the first key hashes, how each step's digest is written). The patient
# form is the one medsim always stored (HMAC(key, id) in hex), so old hashes still match.
KINDS = {
    "patient": (lambda v: v.strip(), lambda d: d),
    "path": (lambda v: "path:" + v, lambda d: d),
    "uid": (lambda v: "uid:" + v.strip(), _as_uid),
}


@dataclass(frozen=True)
class Keyring:
    keys: tuple[str, ...]  # oldest first; the last is MEDSIM_PATIENT_KEY

    def hash(self, kind: str, value: str) -> str:
        first, write = KINDS[kind]
        out = first(value)
        for key in self.keys:
            out = write(_hmac(key, out))
        return out

    def patient(self, patient_id: str) -> str:
        return self.hash("patient", patient_id)

    def path(self, rel: str) -> str:
        return self.hash("path", rel)

    def uid(self, uid: str) -> str:
        return self.hash("uid", uid)

    def step(self, kind: str, stored: str, new_key: str) -> str:
        """A stored value rewritten for one more key (rotation)."""
        return KINDS[kind][1](_hmac(new_key, stored))

    @property
    def fingerprints(self) -> list[str]:
        return [fingerprint(k) for k in self.keys]


def configured(why: str) -> Keyring:
    """The key chain from the settings, or BadArgument saying why it is needed."""
    s = settings.get()
    keys = (*s.patient_keys_previous, s.patient_key) if s.patient_key else ()
    if not keys:
        raise BadArgument(f"{why}, which medsim stores only as keyed hashes: set MEDSIM_PATIENT_KEY to a secret of "
                          f"at least {MIN_KEY_LENGTH} characters (keep it: the same key must be used for every later "
                          f"ingest, search filter and deletion)")
    short = [i for i, k in enumerate(keys) if len(k) < MIN_KEY_LENGTH]
    if short:
        raise BadArgument(f"MEDSIM_PATIENT_KEY{'_PREVIOUS' if short[0] < len(keys) - 1 else ''} must be at least "
                          f"{MIN_KEY_LENGTH} characters")
    return Keyring(tuple(keys))


def keyring(conn, why: str) -> Keyring:
    """The configured key chain, checked against the one this database was hashed with
    (recorded here the first time, in its own transaction so concurrent ingests agree)."""
    ring = configured(why)
    with conn.transaction():
        conn.execute(Q.record_key_fingerprints, {"fingerprints": ring.fingerprints})
    stored = scalar(conn, Q.key_fingerprints)
    if list(stored) != ring.fingerprints:
        raise BadArgument(
            f"this database's patient ids, paths and UIDs were hashed with another key (fingerprint "
            f"{' -> '.join(stored)}; MEDSIM_PATIENT_KEY here gives {' -> '.join(ring.fingerprints)}): set the key "
            f"used before (and MEDSIM_PATIENT_KEY_PREVIOUS after a rotation); `medsim keys rotate` changes keys")
    return ring


# (table, column, kind): every keyed column rotation rewrites (identifiers from this
# constant list, composed with psycopg.sql)
ROTATED = (
    ("images", "patient_key", "patient"),
    ("images", "source_path", "path"),
    ("images", "study_id", "uid"),
    ("ingest_problems", "path", "path"),
    ("ingest_reports", "source", "path"),
    ("datasets", "source_file", "path"),
    ("source_files", "path", "path"),
)
UID_TAGS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
# medsim.pacs_instances keeps UIDs in clear (the way back to the PACS), but a deleted
# patient's as HASHED + uid(...): the rows stay, so a sync still knows them as settled
PACS_HASHED = ("study_uid", "series_uid", "sop_uid")
HASHED = "k:"


def rotate(conn, new_key: str) -> dict:
    """Rewrite every keyed hash for one more key, and record the longer chain, in one
    transaction -> how many values changed, per column. The configured chain must be this
    database's (keyring() checks it)."""
    if len(new_key or "") < MIN_KEY_LENGTH:
        raise BadArgument(f"MEDSIM_NEW_PATIENT_KEY must be at least {MIN_KEY_LENGTH} characters")
    with conn.transaction():
        ring = keyring(conn, "rotation rewrites the keyed hashes")
        if new_key in ring.keys:
            raise BadArgument("the new key is already in the chain: choose a new secret")
        conn.execute(Q.lock_key_fingerprints)
        counts = {}
        for table, column, kind in ROTATED:
            t, c = sql.Identifier("medsim", table), sql.Identifier(column)
            old = [r[0] for r in conn.execute(sql.SQL("SELECT DISTINCT {c} FROM {t} WHERE {c} IS NOT NULL").format(
                t=t, c=c)).fetchall()]
            if table == "datasets":  # MedMNIST rows keep their (public) file path
                old = [v for v in old if not v.startswith("/")]
            new = [ring.step(kind, v, new_key) for v in old]
            counts[f"{table}.{column}"] = conn.execute(sql.SQL(
                "UPDATE {t} x SET {c} = m.new FROM unnest(%(old)s::text[], %(new)s::text[]) AS m(old, new) "
                "WHERE x.{c} = m.old").format(t=t, c=c), {"old": old, "new": new}).rowcount
        for tag in UID_TAGS:
            old = [r[0] for r in conn.execute(Q.distinct_metadata_values, {"tag": tag}).fetchall()]
            new = [ring.step("uid", v, new_key) for v in old]
            counts[f"images.metadata.{tag}"] = conn.execute(Q.rewrite_metadata_values, {
                "tag": tag, "old": old, "new": new}).rowcount
        old = [r[0] for r in conn.execute(Q.deleted_patients).fetchall()]
        counts["deletions.target"] = conn.execute(Q.rewrite_deleted_patients, {
            "old": old, "new": [ring.step("patient", v, new_key) for v in old]}).rowcount
        for column in PACS_HASHED:  # a withdrawn patient's PACS instances: "k:" + the keyed UID
            c = sql.Identifier(column)
            old = [r[0] for r in conn.execute(sql.SQL(
                "SELECT DISTINCT {c} FROM medsim.pacs_instances WHERE starts_with({c}, %(p)s)").format(c=c),
                {"p": HASHED}).fetchall()]
            new = [HASHED + ring.step("uid", v[len(HASHED):], new_key) for v in old]
            counts[f"pacs_instances.{column}"] = conn.execute(sql.SQL(
                "UPDATE medsim.pacs_instances x SET {c} = m.new FROM unnest(%(old)s::text[], %(new)s::text[]) "
                "AS m(old, new) WHERE x.{c} = m.old").format(c=c), {"old": old, "new": new}).rowcount
        conn.execute(Q.set_key_fingerprints, {"fingerprints": [*ring.fingerprints, fingerprint(new_key)]})
    return counts
