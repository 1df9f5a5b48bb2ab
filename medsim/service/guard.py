"""What stands between the network and the data: failed-attempt limits, who the client
is (the peer, or what a trusted proxy says), the loopback rule for /metrics and /healthz,
and the security headers every response carries.

The limiter is a few lines of our own rather than slowapi: slowapi counts every request
per key, while what must be limited here is failed authentication, and it must never be
turned against the users it protects (OWASP ASVS V11: a lockout must not be a denial of
service). So:
- a request whose token checks out is never refused by the limiter, whatever others did
  from its address or with its token id (the secret is checked first: one indexed
  lookup, the price of not letting strangers lock a user out);
- failures count per (address, token id) and per address; past a limit, *failing*
  requests get 429 instead of 401, so guessing slows down and nobody else notices.
A token's id is no key of its own: ids are sequential, and 5 requests naming id 2 from
anywhere used to lock token 2 out. The secret (256 bits) needs no per-token limit to
resist guessing.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import deque
from dataclasses import dataclass

from medsim.errors import BadArgument, TooManyRequests

# A page with no inline script or style, framed by nobody; thumbnails the page fetched
# with its token are blob: URLs.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
HEADERS = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
           (b"x-frame-options", b"DENY"), (b"referrer-policy", b"no-referrer")]


class FailureLimiter:
    """At most `per_address` failed attempts per client address and `per_pair` per (address,
    token id) within `window_s`; past that, a failing request is answered 429 until the
    oldest failure leaves the window. Only failures are ever refused (see the module)."""

    def __init__(self, per_address: int = 10, per_pair: int = 5, window_s: float = 60.0):
        self.limits = {"address": per_address, "pair": per_pair}
        self.window_s = window_s
        self.failures: dict[tuple, deque] = {}
        self.lock = threading.Lock()

    def _keys(self, address: str | None, token_id: int | None):
        yield ("address", address or "unknown")
        if token_id is not None:
            yield ("pair", address or "unknown", token_id)

    def failed(self, address: str | None, token_id: int | None) -> None:
        """Count a failure; TooManyRequests when this one is past a limit."""
        now = time.monotonic()
        with self.lock:
            if len(self.failures) > 100_000:  # a flood of addresses: forget the idle ones
                self.failures = {k: q for k, q in self.failures.items() if q and now - q[-1] <= self.window_s}
            over = None
            for key in self._keys(address, token_id):
                q = self.failures.setdefault(key, deque())
                while q and now - q[0] > self.window_s:
                    q.popleft()
                q.append(now)
                if len(q) > self.limits[key[0]] and over is None:
                    over = (key[0], int(self.window_s - (now - q[0])) + 1)
        if over is not None:
            what = "this address" if over[0] == "address" else "this address with this token id"
            err = TooManyRequests(f"too many failed attempts from {what}; try again in {over[1]} s "
                                  f"(a valid token is never refused)")
            err.retry_after = over[1]
            raise err


@dataclass(frozen=True)
class Client:
    """Who sent a request, as the access log records it: `address` is the one the limits
    and the log's client column use (the peer, or what a trusted proxy reported);
    `forwarded` the X-Forwarded-For chain as received, kept apart whoever sent it."""

    address: str | None
    forwarded: str | None = None

    def __str__(self) -> str:
        return self.address or "unknown"


class TrustedProxies:
    """uvicorn's and gunicorn's --forwarded-allow-ips: X-Forwarded-For is read only when the
    peer is one of these (addresses or networks; '*' trusts every peer). Default: none,
    so a client cannot write another address into the log by sending the header."""

    def __init__(self, spec: str | None = None):
        self.any = False
        self.networks = []
        for part in (spec or "").split(","):
            part = part.strip()
            if not part:
                continue
            if part == "*":
                self.any = True
                continue
            try:
                self.networks.append(ipaddress.ip_network(part, strict=False))
            except ValueError:
                raise BadArgument(f"--forwarded-allow-ips takes addresses or networks separated by commas "
                                  f"(127.0.0.1,10.0.0.0/8) or '*'; {part!r} is neither") from None

    def trusts(self, address: str | None) -> bool:
        if self.any:
            return address is not None
        try:
            ip = ipaddress.ip_address(address or "")
        except ValueError:
            return False
        return any(ip in net for net in self.networks)

    def client(self, peer: str | None, forwarded: str | None) -> Client:
        """The rightmost address in the chain that is not a trusted proxy (the first hop
        that no trusted party vouches for), when the peer is trusted; else the peer."""
        forwarded = (forwarded or "").strip()[:1000] or None  # a header is not a place to store a book
        address = peer
        if forwarded and self.trusts(peer):
            for hop in reversed([h.strip() for h in forwarded.split(",")]):
                address = hop
                if not self.trusts(hop):
                    break
            try:
                ipaddress.ip_address(address or "")
            except ValueError:
                address = peer  # garbage from the proxy's client: the proxy is who we know
        return Client(address, forwarded)


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
