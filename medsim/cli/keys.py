"""`medsim keys`: the pseudonym key chain (what MEDSIM_PATIENT_KEY hashes), checked,
used by hand, and rotated."""

from __future__ import annotations

from medsim import settings
from medsim.cli.common import connect
from medsim.errors import BadArgument


def cmd_keys(args) -> int:
    from medsim.sources import keys

    with connect(args) as conn:
        if args.keys_command == "check":
            ring = keys.keyring(conn, "checking the key needs it")
            print(f"MEDSIM_PATIENT_KEY is this database's key (fingerprints {' -> '.join(ring.fingerprints)})")
        elif args.keys_command == "hash":
            ring = keys.keyring(conn, "hashing needs the key")
            given = [(kind, v) for kind, v in (("patient", args.patient), ("path", args.path), ("uid", args.uid))
                     if v is not None]
            if len(given) != 1:
                raise BadArgument("give one of --patient, --path or --uid")
            kind, value = given[0]
            print(ring.hash(kind, value))
        elif args.keys_command == "locate":
            from pathlib import Path

            from medsim.sources import ledger

            ring = keys.keyring(conn, "finding a file needs the key its path was hashed with")
            if not Path(args.folder).is_dir():
                raise BadArgument(f"{args.folder}: not a folder")
            found = ledger.locate(conn, ring, args.image, Path(args.folder), args.follow_links)
            if found is None:
                raise BadArgument(f"no file under {args.folder} hashes to image {args.image}'s path: give the "
                                  f"folder it was ingested from (for a manifest, the manifest's folder)")
            print(Path(args.folder) / found)
        else:
            counts = keys.rotate(conn, settings.get().new_patient_key or "")
            for column, n in counts.items():
                print(f"  {column}: {n} rewritten")
            print("rotated, in one transaction. From now on set MEDSIM_PATIENT_KEY to the new key, and put the "
                  "previous one(s) in MEDSIM_PATIENT_KEY_PREVIOUS (oldest first, one per line); keep both secret")
    return 0


def register(sub) -> None:
    s = sub.add_parser("keys", help="the pseudonym key (MEDSIM_PATIENT_KEY): check it, hash a value, rotate it",
                       description="Patient ids, file paths and DICOM UIDs are stored only as keyed hashes. This "
                                   "database records a fingerprint of its key and refuses another.")
    ksub = s.add_subparsers(dest="keys_command", required=True)
    ksub.add_parser("check", help="is MEDSIM_PATIENT_KEY this database's key?").set_defaults(func=cmd_keys)
    h = ksub.add_parser("hash", help="the stored form of a value from the source (to find its rows in SQL)")
    h.add_argument("--patient", default=None, metavar="ID", help="a patient id")
    h.add_argument("--path", default=None, metavar="REL", help="a file's path relative to its archive")
    h.add_argument("--uid", default=None, metavar="UID", help="a study id or DICOM UID")
    h.set_defaults(func=cmd_keys)
    lo = ksub.add_parser("locate", help="the file an image came from, found in its archive's folder (paths are "
                                        "stored keyed: each file's path is hashed until one matches)")
    lo.add_argument("image", type=int, metavar="IMAGE_ID")
    lo.add_argument("--in", dest="folder", required=True, metavar="FOLDER",
                    help="the folder ingest-folder read (for a manifest: the manifest's folder)")
    lo.add_argument("--follow-links", action="store_true", help="as the ingest did")
    lo.set_defaults(func=cmd_keys)
    ksub.add_parser("rotate", help="rewrite every keyed hash for the key in MEDSIM_NEW_PATIENT_KEY (one "
                                   "transaction)").set_defaults(func=cmd_keys)
