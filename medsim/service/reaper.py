"""What a SQL login cannot lift: medsim gives every `--sql-login` role a statement and an
idle-in-transaction timeout (access.SQL_LOGIN_LIMITS), but any role may SET its own
session's settings. While `medsim serve` runs, this thread ends what runs past those
limits anyway (a query cancelled, a session idle in a transaction closed), every few
seconds, with one query (queries.sql `reap_sql_logins`).

Signalling another role's backend needs superuser or pg_signal_backend: the embedded
server's owner is a superuser; a managed server's owner needs `GRANT pg_signal_backend`
(docs/operations.md). Without it the reaper says so once and stops.
"""

from __future__ import annotations

import logging
import threading

import psycopg

from medsim.queries import Q

log = logging.getLogger("medsim.serve")

STATEMENT_S = 60.0  # access.SQL_LOGIN_LIMITS' statement_timeout
IDLE_IN_TRANSACTION_S = 300.0  # and its idle_in_transaction_session_timeout
EVERY_S = 5.0


def reap_once(conn, statement_s: float = STATEMENT_S, idle_s: float = IDLE_IN_TRANSACTION_S) -> list[tuple]:
    """End what SQL logins run past the limits -> (pid, role, state, signalled) per session."""
    ended = conn.execute(Q.reap_sql_logins, {"statement_s": statement_s, "idle_s": idle_s}).fetchall()
    for pid, role, state, ok in ended:
        log.warning("SQL login %s (pid %s): %s past medsim's limit, %s", role, pid, state,
                    "ended" if ok else "could not be signalled")
    return ended


class Reaper(threading.Thread):
    def __init__(self, pool, every_s: float = EVERY_S):
        super().__init__(name="medsim-sql-login-reaper", daemon=True)
        self.pool, self.every_s = pool, every_s
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.every_s):
            try:
                with self.pool.connection() as conn:
                    reap_once(conn)
            except psycopg.errors.InsufficientPrivilege as err:
                log.warning("SQL logins' limits are not enforced: the service's login may not signal their "
                            "sessions (%s); GRANT pg_signal_backend TO it", err)
                return
            except Exception as err:  # the database restarting: try again next round
                log.info("SQL-login reaper: %s", err)

    def stop(self) -> None:
        self.stopped.set()
