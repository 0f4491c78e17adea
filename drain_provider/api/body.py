"""Request bodies, bounded in size and in time, parsed as JSON objects.

Size: a body is never read past MAX_BODY_BYTES (aiohttp's client_max_size answers 413 for one
that grows past it, chunked or not); one whose Content-Length already says it is larger is
refused by `declared_size` before a byte of it is read. Time: a body must arrive within
BODY_TIMEOUT of its reading's start (its headers are in by then), or the request is answered 408.
Both answers close the connection (api/errors.py): whatever the client still sends is not a
request.

A paid endpoint reads its body only after the voucher header has been accepted
(api/completions.py): what a request that cannot pay sends is never read nor parsed.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from .. import safejson
from .errors import ApiError, Handler, error_response, too_large
from .state import SETTINGS


def _declared_too_large(request: web.Request) -> bool:
    length = request.content_length
    return length is not None and length > request.config_dict[SETTINGS].max_body_bytes


@web.middleware
async def declared_size(request: web.Request, handler: Handler) -> web.StreamResponse:
    """413 at once for a Content-Length above MAX_BODY_BYTES, on every route."""
    if _declared_too_large(request):
        raise too_large(request)
    return await handler(request)


async def read_body(request: web.Request) -> bytes:
    """The whole body, within MAX_BODY_BYTES and BODY_TIMEOUT."""
    settings = request.config_dict[SETTINGS]
    try:
        async with asyncio.timeout(settings.body_timeout):
            return await request.read()  # bounded by client_max_size: larger bodies raise 413
    except TimeoutError:
        raise ApiError(
            "request_timeout", f"The request body did not arrive within {settings.body_timeout:g} s."
        ) from None
    except web.RequestPayloadError:  # a Content-Encoding the body does not match, a broken chunk
        raise ApiError(
            "invalid_request", "The request body could not be decoded: a broken Content-Encoding or chunk."
        ) from None


def parse_json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = safejson.loads(raw)
    except safejson.TooDeep:
        raise ApiError(
            "invalid_request", f"The request body is nested deeper than {safejson.MAX_DEPTH} levels."
        ) from None
    except ValueError:
        raise ApiError("invalid_request", "The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise ApiError("invalid_request", "The request body must be a JSON object.")
    return body


async def expect_continue(request: web.Request) -> web.StreamResponse | None:
    """`Expect: 100-continue` is answered "100 Continue" only for a body that would be read: one
    whose declared length is over MAX_BODY_BYTES is refused first, so the client never sends it.
    Any other expectation is a 417 with our error body. (aiohttp's own handler answers before the
    size is looked at, and puts the header's text in its 417, which fails on bytes that are not
    UTF-8: a 500.) It runs before the middlewares, so it answers with a response, not an error."""
    if request.headers.get("Expect", "").lower() != "100-continue":
        return error_response(request, ApiError("expectation_failed"))
    if _declared_too_large(request):
        return error_response(request, too_large(request))
    if request.version >= (1, 1):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the 100 is not part of the answer
    return None


async def unrouted(request: web.Request) -> web.StreamResponse:
    """What no route of the app takes: 404, or 405 where another route has the path, as aiohttp
    would answer, but from a route of ours, so that its Expect header is ours to answer too."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource is not request.match_info.route.resource:
            allowed |= (await resource.resolve(request))[1]
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise web.HTTPNotFound()


def answer_expect_headers(app: web.Application) -> None:
    """Give every request to `app`, routed or not, `expect_continue`: a last route takes what no
    other does (`unrouted`), and each route gets the handler. aiohttp takes an expect handler only
    as an argument of each route's registration, and routes come from RouteTableDefs: setting it
    afterwards is one private attribute (tests/test_unpaid.py fails if aiohttp renames it)."""
    app.router.add_route("*", "/{unrouted:.*}", unrouted)
    for route in app.router.routes():
        route._expect_handler = expect_continue
