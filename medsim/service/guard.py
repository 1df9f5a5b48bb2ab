"""What stands between the network and the data: failed-attempt limits, the loopback rule
for /metrics and /healthz, and the security headers every response carries.

The limiter is a few lines of our own rather than slowapi: slowapi counts every request
per key, while what must be limited here is failed authentication (per client address,
and per token id, so a leaked token id cannot be brute-forced from many addresses), and a
user's legitimate requests must never be slowed by it.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import deque

from medsim.errors import TooManyRequests

# A page with no inline script or style, framed by nobody; thumbnails the page fetched
# with its token are blob: URLs.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
HEADERS = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
           (b"x-frame-options", b"DENY"), (b"referrer-policy", b"no-referrer")]


class FailureLimiter:
    """At most `per_address` failed attempts per client address and `per_token` per token
    id within `window_s`; past that, 429 until the oldest failure leaves the window."""

    def __init__(self, per_address: int = 10, per_token: int = 5, window_s: float = 60.0):
        self.limits = {"address": per_address, "token": per_token}
        self.window_s = window_s
        self.failures: dict[tuple, deque] = {}
        self.lock = threading.Lock()

    def _keys(self, address: str | None, token_id: int | None):
        yield ("address", address or "unknown")
        if token_id is not None:
            yield ("token", token_id)

    def check(self, address: str | None, token_id: int | None) -> None:
        now = time.monotonic()
        with self.lock:
            for key in self._keys(address, token_id):
                q = self.failures.get(key)
                while q and now - q[0] > self.window_s:
                    q.popleft()
                if q is not None and len(q) >= self.limits[key[0]]:
                    wait = int(self.window_s - (now - q[0])) + 1
                    err = TooManyRequests(f"too many failed attempts from this {key[0]}; try again in {wait} s")
                    err.retry_after = wait
                    raise err

    def failed(self, address: str | None, token_id: int | None) -> None:
        now = time.monotonic()
        with self.lock:
            if len(self.failures) > 100_000:  # a flood of addresses: forget the idle ones
                self.failures = {k: q for k, q in self.failures.items() if q and now - q[-1] <= self.window_s}
            for key in self._keys(address, token_id):
                self.failures.setdefault(key, deque()).append(now)


def is_loopback(address: str | None) -> bool:
    try:
        return address is not None and ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "testclient"  # Starlette's TestClient (in-process, no network)


class SecurityHeaders:
    """Adds HEADERS to every HTTP response (pure ASGI: no buffering of the body)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message):
            if message["type"] == "http.response.start":
                have = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [h for h in HEADERS if h[0] not in have]
            await send(message)

        await self.app(scope, receive, with_headers)
