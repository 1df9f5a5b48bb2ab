"""Batches in flight. One lane runs each batch inline on the worker's connection. Two
lanes (--prefetch) run batches in two threads on two connections, so one batch is
claimed, decoded and written while the other is embedded (the job's compute lock keeps
the forward passes apart). Every batch is still one whole transaction on its lane's own
connection; a lane holds at most one batch."""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor

from medsim.worker.batch import run_batch


class Lanes:
    def __init__(self, conns: list):
        self.conns = conns
        self.free = deque(range(len(conns)))
        self.inflight: deque = deque()  # (lane, Future), oldest first
        self.pool = ThreadPoolExecutor(len(conns), thread_name_prefix="medsim-lane") if len(conns) > 1 else None

    def next(self, job, summary, more: bool = True) -> int:
        """The next batch's result, counted in summary -> images it claimed. Its errors
        (the batch rolled back) are raised here."""
        if self.pool is None:
            return summary.account(run_batch(self.conns[0], job))
        while more and self.free:
            lane = self.free.popleft()
            self.inflight.append((lane, self.pool.submit(run_batch, self.conns[lane], job)))
        if not self.inflight:
            return 0
        lane, future = self.inflight.popleft()
        self.free.append(lane)
        return summary.account(future.result())

    def settle(self, summary) -> tuple[int, list[Exception]]:
        """Wait for every batch in flight (each commits or rolls back on its own) -> (images
        they claimed, their errors), so the caller decides what an error means."""
        claimed, errors = 0, []
        while self.inflight:
            lane, future = self.inflight.popleft()
            self.free.append(lane)
            try:
                claimed += summary.account(future.result())
            except Exception as err:
                errors.append(err)
        return claimed, errors

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
