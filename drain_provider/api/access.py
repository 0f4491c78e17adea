"""The access log and the request id: one line per request, and `X-Request-Id` on every answer.

The middleware is the outermost one, so it sees every answer as the client gets it: a refused
payment (402), a bad body (400), a 429, a 404 of an unknown route (all made answers by the error
middleware inside it), a CORS preflight, and a stream, logged when it ends with how it ended
(a client that leaves mid-way is status 499, as nginx logs it). It makes the request's
`RequestInfo` (requestinfo.py), which the gate, the charge, the upstream client and the relay
fill in, and at the end hands it to the metrics (`Metrics.finish`) and to the log.

The request id is the client's `X-Request-Id` when it is a sane one (at most 128 characters of a
safe alphabet: nothing that could break a log line or a JSON field), else one of ours; it is
echoed on every answer (set when the response is prepared, so streams and errors carry it) and
stored with a paid request's usage row, so that a log line and the ledger can be joined.

Logged, as `access key=value ...` on the `drain_provider.access` logger at INFO: request_id,
method, route (the canonical path: never the raw path nor the query string), status, code (the
X-DRAIN-Error code, or none), ms, client (api/clients.py's address, behind trusted proxies), and
when known channel, model, cost (base units charged), in/out tokens, ending, shadowed (a refusal
served anyway), free. Never a voucher, a header's text, a body or a query string.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re

from aiohttp import web
from aiohttp.typedefs import Middleware

from ..config import Settings
from ..metrics import NO_ERROR, UNMATCHED_ROUTE, Metrics
from ..requestinfo import CURRENT, RequestInfo, now
from .body import unrouted
from .clients import client_address
from .errors import Handler

log = logging.getLogger("drain_provider.access")

REQUEST_ID_HEADER = "X-Request-Id"
_SANE_ID = re.compile(r"[0-9A-Za-z._:+/=@-]{1,128}")
CLIENT_CLOSED = 499  # the client left before its answer ended
INFO = web.RequestKey("drain_request_info", RequestInfo)


def request_id(sent: str | None) -> str:
    """The client's id when it is sane, else a new one (16 hex digits)."""
    if sent is not None and _SANE_ID.fullmatch(sent):
        return sent
    return os.urandom(8).hex()


def _route(request: web.Request) -> str:
    """The route's canonical path; "unmatched" for a path no route serves (the catch-all of
    api/body.py answers those 404)."""
    route = request.match_info.route
    if route.resource is None or route.handler is unrouted:
        return UNMATCHED_ROUTE
    return route.resource.canonical


def access_middleware(settings: Settings, metrics: Metrics) -> Middleware:
    """The middleware, bound to the app's settings (trusted proxies) and metrics."""
    in_flight = metrics.in_flight

    @web.middleware
    async def access(request: web.Request, handler: Handler) -> web.StreamResponse:
        info = RequestInfo(request_id(request.headers.get(REQUEST_ID_HEADER)), _route(request), now())
        request[INFO] = info
        token = CURRENT.set(info)
        in_flight.add(info)
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # a redirect (errors are answers by now)
            _end(request, info, exc.status, NO_ERROR)
            raise
        except asyncio.CancelledError:
            _end(request, info, CLIENT_CLOSED, NO_ERROR)
            raise
        except BaseException:
            _end(request, info, 500, "internal_error")
            raise
        finally:
            CURRENT.reset(token)
            in_flight.discard(info)
        _end(request, info, response.status, response.headers.get("X-DRAIN-Error", NO_ERROR))
        return response

    def _end(request: web.Request, info: RequestInfo, status: int, code: str) -> None:
        metrics.finish(info, status, code)
        if log.isEnabledFor(logging.INFO):
            log.info("%s", _line(request, info, status, code, settings))

    return access


def _line(request: web.Request, info: RequestInfo, status: int, code: str, settings: Settings) -> str:
    address = client_address(request.remote, request.headers.get("X-Forwarded-For"), settings.trusted_proxies)
    parts = [
        f"access request_id={info.request_id} method={request.method} route={info.route} status={status} "
        f"code={code} ms={(now() - info.started) * 1000:.1f} client={address or 'unknown'}"
    ]
    if info.channel is not None:
        parts.append(f"channel={info.channel}")
    if info.model is not None:
        parts.append(f"model={info.model}")
    if info.cost is not None:
        parts.append(f"cost={info.cost}")
    if info.input_tokens is not None:
        parts.append(f"in={info.input_tokens} out={info.output_tokens}")
    if info.ending is not None:
        parts.append(f"ending={info.ending}")
    if info.shadowed is not None:
        parts.append(f"shadowed={info.shadowed}")
    if info.free:
        parts.append("free=true")
    return " ".join(parts)


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every answer carries its request id (a stream's headers leave before
    its handler returns, hence here and not in the middleware)."""
    info = request.get(INFO)
    if info is not None:
        response.headers[REQUEST_ID_HEADER] = info.request_id
