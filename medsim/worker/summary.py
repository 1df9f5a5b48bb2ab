"""What a worker run did, and where its time went."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Summary:
    embedded: int = 0
    failed: int = 0  # images failed for good this run (max attempts reached)
    lock_waits: int = 0  # batches rolled back after waiting lock_timeout_s for a lock
    seconds: float = 0.0
    # wall seconds per stage, so a slow run says where its time went: start (connect,
    # load the model, queue), claim, decode, embed (forward incl. device transfers),
    # copy (binary COPY), dequeue (and failure rows), commit, after (ANALYZE, HNSW build)
    phases: dict = field(default_factory=dict)
    retry_ids: set = field(default_factory=set)  # images that failed this run, not for good
    promoted: list = field(default_factory=list)  # candidates this worker made current (--promote-when-ready)
    models: list = field(default_factory=list)  # the models it embedded for, in turn (current, then candidates)

    @property
    def retrying(self) -> int:
        """Images (not attempts: one image can fail twice in a run) to be tried again."""
        return len(self.retry_ids)

    def credit(self, phase: str, seconds: float) -> None:
        self.phases[phase] = self.phases.get(phase, 0.0) + seconds

    def account(self, r) -> int:
        """Count a committed batch (medsim.worker.batch.Result) -> images it claimed."""
        for phase, s in r.seconds.items():
            self.credit(phase, s)
        self.embedded += r.embedded
        for image_id, _, final in r.failures:
            if final:
                self.failed += 1
                self.retry_ids.discard(image_id)
            else:
                self.retry_ids.add(image_id)
        return r.claimed

    def line(self) -> str:
        rate = self.embedded / self.seconds if self.seconds else 0.0
        retry = f" ({self.retrying} to retry)" if self.retrying else ""
        return (f"embedded {self.embedded}, failed {self.failed}{retry}, {rate:,.0f} images/s "
                f"({self.seconds:.1f}s)")

    def breakdown(self) -> str:
        total = self.seconds or sum(self.phases.values()) or 1.0
        parts = {**self.phases, "other (enqueue, idle)": max(0.0, total - sum(self.phases.values()))}
        return ", ".join(f"{k} {v:.3f}s ({v / total:.0%})" for k, v in parts.items())
