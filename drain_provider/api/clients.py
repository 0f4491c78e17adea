"""Who a request comes from, and the per-client limit on refused payments (docs/PROTOCOL.md,
"Errors": `rate_limited`).

The client is the connection's peer, unless that peer is one of TRUSTED_PROXIES: then it is the
rightmost address of X-Forwarded-For that is not a trusted proxy (each proxy appends the address
it was reached from, so the entries left of the last untrusted one are the client's to forge).
An IPv6 client is counted by its /64, the block a single host or home is usually given.

Every paid route is wrapped by `limit_payment_failures`: a client over its limit is answered 429
before anything of its request is read, and each request that fails payment (any 402, and the
400, 408 and 413 that come before payment) counts against it. What succeeds never does. The
channel routes (`limit_channel_failures`) count their 401 and 404 too.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
from collections.abc import Sequence

from aiohttp import web

from ..config import IPNetwork
from ..ratelimit import FailureLimiter
from .errors import ApiError, Handler, client_error
from .state import LIMITER, SETTINGS

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# What failing payment means: refused for the voucher (402), or for the body (400, 408, 413).
# Not 503 (our RPC) nor 5xx: those are not the client's doing.
FAILED_PAYMENT_STATUSES = frozenset({400, 402, 408, 413})
# On the channel endpoints: those, a channel that is not ours (404) and a signature refused (401).
FAILED_CHANNEL_STATUSES = FAILED_PAYMENT_STATUSES | {401, 404}
MAX_FORWARDED_HOPS = 32  # a longer X-Forwarded-For is looked at from its right end only


def _address(text: str) -> IPAddress | None:
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _trusted(address: IPAddress, proxies: Sequence[IPNetwork]) -> bool:
    return any(address in network for network in proxies)


def client_address(peer: str | None, forwarded_for: str | None, proxies: Sequence[IPNetwork]) -> IPAddress | None:
    """The client's address: `peer`, or, from a trusted proxy, the rightmost X-Forwarded-For
    entry that is not a trusted proxy (the leftmost if all are). An entry that is not an address
    ends the walk: the last good one stands, the one a trusted proxy vouched for."""
    address = _address(peer) if peer else None
    if address is None or not forwarded_for or not _trusted(address, proxies):
        return address
    for entry in reversed(forwarded_for.split(",")[-MAX_FORWARDED_HOPS:]):
        hop = _address(entry)
        if hop is None:
            break
        address = hop
        if not _trusted(address, proxies):
            break
    return address


def limit_key(address: IPAddress | None) -> str:
    """The limiter's key for a client: its IPv4 address, or its IPv6 /64."""
    if address is None:
        return "unknown"
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def request_client(request: web.Request) -> str:
    settings = request.config_dict[SETTINGS]
    return limit_key(client_address(request.remote, request.headers.get("X-Forwarded-For"), settings.trusted_proxies))


# How long a request over the limit waits for its 429: it holds a connection (MAX_CONNECTIONS
# bounds those), not the CPU. tests/reliability/slow.py measures what it is for.
LIMITED_ANSWER_DELAY = 1.0


def limit_payment_failures(handler: Handler) -> Handler:
    """Wrap a paid route: 429 for a client over its limit, and its refused payments counted."""
    return _limited(handler, FAILED_PAYMENT_STATUSES)


def limit_channel_failures(handler: Handler) -> Handler:
    """Wrap a channel route (api/channels.py): the same limit, counting its refusals too: an
    unknown channel (404, looked up on chain) and a signature refused (401)."""
    return _limited(handler, FAILED_CHANNEL_STATUSES)


def _limited(handler: Handler, counted: frozenset[int]) -> Handler:
    @functools.wraps(handler)
    async def limited(request: web.Request) -> web.StreamResponse:
        limiter: FailureLimiter = request.config_dict[LIMITER]
        if not limiter.enabled:
            return await handler(request)
        client = request_client(request)
        wait = limiter.retry_after(client)
        if wait is not None:
            # A client over its limit that does not wait as told gets its 429 only after a pause:
            # answered at once, four such clients keep the event loop as busy as paying ones.
            await asyncio.sleep(LIMITED_ANSWER_DELAY)
            raise ApiError(
                "rate_limited",
                f"Too many refused payments from this address: retry in {wait} s. Requests that pay never count.",
                headers={"Retry-After": str(wait)},
            )
        try:
            return await handler(request)
        except Exception as exc:
            error = client_error(request, exc)
            if error is not None and error.status in counted:
                already = limiter.retry_after(client) is not None  # concurrent failures: log the first
                limiter.fail(client)
                if not already and limiter.retry_after(client) is not None:
                    log.info("payment_failures_limited client=%s code=%s", client, error.code)
            raise

    return limited
