"""CORS: browser wallets and web apps call the paid and public endpoints from their own pages.

A browser sends a preflight `OPTIONS` before a paid request (its X-DRAIN-Voucher header and JSON
body make it a non-simple request), and lets the page read only the response headers listed in
`Access-Control-Expose-Headers`: without them a web app sees neither what a request cost nor why
a payment was refused. So the preflight is answered here, before anything else runs (it carries
no voucher, is not a refused payment and reads no body), and every answer of an allowed origin
exposes the X-DRAIN-*, X-Payment-*, Retry-After and X-Request-Id headers it carries. The headers are added when
a response is prepared, not by the middleware: a stream's headers leave before its handler
returns. `/v1/admin` never answers a browser: its bearer token belongs to the operator's scripts.
"""

from __future__ import annotations

import re

from aiohttp import web

from .errors import Handler
from .state import SETTINGS

ADMIN_PREFIX = "/v1/admin"
ALLOW_METHODS = "GET, POST, OPTIONS"
# What our clients send. The headers a preflight asks for are allowed as well: the openai SDK
# in a browser adds its own (x-stainless-*), and a page's request must not fail on one of them.
ALLOW_HEADERS = ("Content-Type", "Authorization", "X-DRAIN-Voucher", "X-Request-Id")
MAX_AGE = "7200"  # seconds a browser may cache a preflight (Chromium's own ceiling)
EXPOSED_PREFIXES = ("x-drain-", "x-payment-")
EXPOSED_NAMES = frozenset({"retry-after", "x-request-id"})
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")
_MAX_REQUESTED = 32  # names taken from one preflight's Access-Control-Request-Headers


def allowed_origin(request: web.Request) -> str | None:
    """The Access-Control-Allow-Origin of this request's answer; None when it gets none (an
    admin path, CORS off, an origin not listed, no Origin under a list)."""
    origins = request.config_dict[SETTINGS].cors_origins
    if not origins or request.path.startswith(ADMIN_PREFIX):
        return None
    if origins == ("*",):
        return "*"
    origin = request.headers.get("Origin")
    return origin if origin in origins else None


def _allow_headers(request: web.Request) -> str:
    requested = request.headers.get("Access-Control-Request-Headers", "")
    names = [name.strip() for name in requested.split(",")[:_MAX_REQUESTED]]
    known = {name.lower() for name in ALLOW_HEADERS}
    extra = [name for name in names if _TOKEN.fullmatch(name) and name.lower() not in known]
    return ", ".join((*ALLOW_HEADERS, *dict.fromkeys(extra)))


@web.middleware
async def cors_preflight(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A preflight of an allowed origin is answered 204 at once; anything else goes on (an
    OPTIONS that is not a preflight, or of an origin not allowed, gets the route's 405)."""
    preflight = request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers
    if preflight and allowed_origin(request) is not None:
        headers = {
            "Access-Control-Allow-Methods": ALLOW_METHODS,
            "Access-Control-Allow-Headers": _allow_headers(request),
            "Access-Control-Max-Age": MAX_AGE,
        }
        return web.Response(status=204, headers=headers)
    return await handler(request)


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: the origin allowed, and which headers the page may read."""
    origins = request.config_dict[SETTINGS].cors_origins
    if not origins or request.path.startswith(ADMIN_PREFIX):
        return
    if origins != ("*",):
        response.headers.add("Vary", "Origin")  # the answer depends on the Origin: caches must know
    origin = allowed_origin(request)
    if origin is None:
        return
    response.headers["Access-Control-Allow-Origin"] = origin
    exposed = [name for name in response.headers if name.lower().startswith(EXPOSED_PREFIXES)]
    exposed += [name for name in response.headers if name.lower() in EXPOSED_NAMES]
    if exposed:
        response.headers["Access-Control-Expose-Headers"] = ", ".join(dict.fromkeys(exposed))
