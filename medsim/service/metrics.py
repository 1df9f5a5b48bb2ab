"""Prometheus text exposition for `GET /metrics`: request counts and latency histograms.

A few dozen lines instead of prometheus_client: one process, a handful of series, and
nothing to configure. Series are labelled as Prometheus's naming guide asks (base units,
`_total` for counters, `_seconds` histograms with cumulative `le` buckets).
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

# 0.5 ms .. 10 s: a search by id is a few ms; an upload with a cold model, seconds
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)

# the stages a search goes through (the decode, embed, search, fetch)
STAGES = ("decode", "embed", "search", "fetch")


class Histogram:
    def __init__(self):
        self.counts = [0] * (len(BUCKETS) + 1)  # the last one is +Inf
        self.total = 0.0
        self.n = 0

    def observe(self, seconds: float) -> None:
        i = next((j for j, b in enumerate(BUCKETS) if seconds <= b), len(BUCKETS))
        self.counts[i] += 1
        self.total += seconds
        self.n += 1

    def lines(self, name: str, labels: str) -> list[str]:
        out, running = [], 0
        for b, c in zip((*BUCKETS, "+Inf"), self.counts, strict=True):
            running += c
            out.append(f'{name}_bucket{{{labels}{"," if labels else ""}le="{b}"}} {running}')
        out.append(f"{name}_sum{{{labels}}} {self.total:.6f}")
        out.append(f"{name}_count{{{labels}}} {self.n}")
        return out


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = {}
        self.latency: dict[str, Histogram] = {}
        self.stages = {s: Histogram() for s in STAGES}
        self.started = time.time()

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        with self.lock:
            key = (method, route, status)
            self.requests[key] = self.requests.get(key, 0) + 1
            self.latency.setdefault(route, Histogram()).observe(seconds)

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            with self.lock:
                self.stages[name].observe(dt)

    def render(self, gauges: dict[str, float] | None = None) -> str:
        lines = ["# HELP medsim_http_requests_total HTTP requests by method, route and status.",
                 "# TYPE medsim_http_requests_total counter"]
        with self.lock:
            for (method, route, status), n in sorted(self.requests.items()):
                lines.append(f'medsim_http_requests_total{{method="{method}",route="{route}",status="{status}"}} {n}')
            lines += ["# HELP medsim_http_request_seconds Request latency by route.",
                      "# TYPE medsim_http_request_seconds histogram"]
            for route, h in sorted(self.latency.items()):
                lines += h.lines("medsim_http_request_seconds", f'route="{route}"')
            lines += ["# HELP medsim_search_stage_seconds Time per search stage: decode (upload to pixels), "
                      "embed (the network), search (the engine), fetch (query and neighbour rows).",
                      "# TYPE medsim_search_stage_seconds histogram"]
            for stage, h in self.stages.items():
                lines += h.lines("medsim_search_stage_seconds", f'stage="{stage}"')
        for name, value in (gauges or {}).items():
            lines += [f"# TYPE {name} gauge", f"{name} {value}"]
        lines += ["# TYPE medsim_process_start_time_seconds gauge",
                  f"medsim_process_start_time_seconds {self.started:.3f}"]
        return "\n".join(lines) + "\n"
