"""Request bodies, bounded in size and in time, parsed as JSON objects.

Size: a body is never read past MAX_BODY_BYTES (aiohttp's client_max_size answers 413 for one
that grows past it, chunked or not); one whose Content-Length already says it is larger is
refused by `declared_size` before a byte of it is read. Time: a body must arrive within
BODY_TIMEOUT of its reading's start (its headers are in by then), or the request is answered 408.
Both answers close the connection (api/errors.py): whatever the client still sends is not a
request.

Parsing a body that did arrive is cheap (orjson, in C, bounded by MAX_BODY_BYTES and by
safejson's depth bound): it comes before the voucher is looked at, so that a body that is not
JSON is an `invalid_request` whatever the voucher.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from .. import safejson
from .errors import ApiError, Handler
from .state import SETTINGS


@web.middleware
async def declared_size(request: web.Request, handler: Handler) -> web.StreamResponse:
    """413 at once for a Content-Length above MAX_BODY_BYTES, on every route."""
    limit = request.config_dict[SETTINGS].max_body_bytes
    length = request.content_length
    if length is not None and length > limit:
        raise ApiError("request_too_large", f"The request body is larger than {limit} bytes.")
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
