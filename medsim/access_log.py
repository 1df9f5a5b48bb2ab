"""The access log's chain, checked and purged (the chain itself: schema/sql/007_access_log.sql).

verify() walks the log in chain order and recomputes every row's hash with the database's
own digest function, so Python and the trigger can never disagree on the canonical form.
It reports the first row where the chain breaks and why: a row whose content no longer
gives its hash (an UPDATE), a gap in the sequence (a DELETE), a row outside the chain or
with a hash that does not follow its predecessor (an insert with the trigger off), time
going backwards (a backdated insert), a head that is not the last row, and the triggers
that should be there (a swapped table comes without them). A purge (purge()) is itself a
row of the chain recording what it removed, so the chain stays verifiable after it.

What it cannot see alone is an owner who rewrites the whole chain after the change with
correct hashes: `verify` prints the head, and `verify --anchor SEQ:HASH` checks that an
anchor copied earlier to a place the owner cannot write is still in the chain.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from psycopg.types.json import Jsonb

from medsim.errors import BadArgument, DataRefused
from medsim.queries import Q

ZERO = bytes(32)
TRIGGERS = ("append_only", "append_only_truncate", "chain")


@dataclass
class Verdict:
    rows: int  # rows checked
    head_seq: int | None
    head_hash: str | None
    broken_at: int | None = None  # chain_seq (or id, for a row outside the chain) of the first break
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None

    def sentence(self) -> str:
        if self.ok:
            return (f"the access log's chain holds: {self.rows:,} row(s); head {self.head_seq}:{self.head_hash} "
                    f"(keep this line somewhere the database owner cannot write; verify --anchor checks it)")
        return f"the access log's chain is broken at row {self.broken_at}: {self.problem}"


def _broken(v: Verdict, at, problem: str) -> Verdict:
    v.broken_at, v.problem = at, problem
    return v


def parse_anchor(text: str) -> tuple[int, bytes]:
    seq, _, digest = (text or "").partition(":")
    try:
        if not seq.isascii() or not seq.isdigit() or len(digest) != 64:
            raise ValueError
        return int(seq), bytes.fromhex(digest)
    except ValueError:
        raise BadArgument(f"an anchor is SEQ:HASH as verify prints it (a number, a colon, 64 hex digits); "
                          f"got {text!r}") from None


def verify(conn, anchors: list[str] = ()) -> Verdict:
    """Walk the chain (one streaming pass over the log, in chain order)."""
    wanted = dict(parse_anchor(a) for a in anchors)
    head = conn.execute(Q.access_log_head).fetchone()
    v = Verdict(0, head[0] if head else None, head[1].hex() if head else None)
    have = {r[0]: r[1] for r in conn.execute(Q.access_log_triggers)}
    for name in TRIGGERS:
        if have.get(name) in (None, "D"):
            return _broken(v, None, f"the trigger {name} on medsim.access_log is "
                                    f"{'missing' if name not in have else 'disabled'} (a swapped or altered table)")
    if head is None:
        return _broken(v, None, "medsim.access_log_head is missing (run medsim migrate)")
    outside = conn.execute(Q.access_log_unchained).fetchone()
    if outside is not None:
        return _broken(v, outside[0], f"row id {outside[0]} is outside the chain (inserted with the trigger off)")
    prev_seq, prev_hash, prev_at = None, None, None
    with conn.transaction(), conn.cursor(name="access_log_verify") as cur:  # server-side: a long log streams
        cur.itersize = 5000
        cur.execute(Q.access_log_walk)
        for seq, row_id, at, prev, stored, recomputed in cur:
            v.rows += 1
            if prev_seq is None:
                # a purged log starts later: a purge row, further on in the chain, vouches for it
                if (seq != 1 or prev != ZERO) and not _purged_start(conn, seq, prev):
                    return _broken(v, seq, "the first row does not start the chain, and no purge record "
                                           "accounts for the rows before it")
            elif seq <= prev_seq:
                return _broken(v, seq, "two rows claim this place in the chain")
            elif seq != prev_seq + 1:
                return _broken(v, prev_seq + 1, f"rows {prev_seq + 1}-{seq - 1} are missing (deleted)")
            elif prev != prev_hash:
                return _broken(v, seq, "its link to the row before does not match that row's hash "
                                       "(a row inserted or replaced out of the chain)")
            if stored != recomputed:
                return _broken(v, seq, f"its content no longer gives its hash (row id {row_id} was changed)")
            if prev_at is not None and at < prev_at:
                return _broken(v, seq, f"its time ({at:%Y-%m-%d %H:%M:%S}) is before the row before it (backdated)")
            if seq in wanted and wanted.pop(seq) != stored:
                return _broken(v, seq, "it differs from the anchor given (the chain was rewritten since)")
            prev_seq, prev_hash, prev_at = seq, stored, at
    if prev_seq != head[0] or (prev_hash or ZERO) != head[1]:
        return _broken(v, prev_seq, f"the head says row {head[0]}, the chain ends at {prev_seq} "
                                    f"(rows removed from the end)")
    if wanted:
        seq = min(wanted)
        return _broken(v, seq, f"the anchor's row {seq} is not in the chain (removed, or purged since)")
    return v


def _purged_start(conn, seq: int, prev: bytes) -> bool:
    """Whether a purge record covers the rows up to seq - 1, the last of them hashing to prev."""
    return any((d or {}).get("through") == seq - 1 and (d or {}).get("last_hash") == prev.hex()
               for (d,) in conn.execute(Q.access_log_purges).fetchall())


def purge(conn, before: dt.datetime, by: str) -> dict:
    """Delete the rows older than `before`, in one transaction that records itself as a row
    of the chain (what went: the sequence range, the count, the last removed row's hash).
    The owner's act alone: the append-only trigger is disabled for this transaction's DELETE
    only (ALTER TABLE takes the table's lock, so no row is written meanwhile)."""
    with conn.transaction():
        conn.execute(Q.access_log_lock_head)
        last = conn.execute(Q.access_log_last_before, {"before": before}).fetchone()
        if last is None:
            raise DataRefused(f"no access-log row is older than {before:%Y-%m-%d %H:%M}: nothing to purge")
        through, last_hash = last
        conn.execute("ALTER TABLE medsim.access_log DISABLE TRIGGER append_only")
        n = conn.execute(Q.access_log_delete_through, {"through": through}).rowcount
        conn.execute("ALTER TABLE medsim.access_log ENABLE TRIGGER append_only")
        detail = {"through": through, "rows": n, "last_hash": last_hash.hex(), "before": before.isoformat()}
        conn.execute(Q.log_access_detail, {"user_name": by, "action": "purge", "detail": Jsonb(detail)})
    return detail
