"""Error responses: an OpenAI-style JSON body, the `X-DRAIN-Error` code, the right status.

`ERRORS` is every code a client can meet, with its HTTP status, OpenAI error type and default
message (docs/PROTOCOL.md, "Errors"; tests/test_docs.py keeps the README and /v1/docs in step
with it). The middleware is the last line of defence for "bad input never produces a 500 or a
traceback": the modules' own errors become their codes, aiohttp's HTTP errors (404, 405, 413)
get our body, and anything unexpected is logged with its traceback and answered with a generic
500 that reveals nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ..openai_format import RequestError, error_body
from ..payments import PaymentError
from ..upstream import UpstreamError
from .discovery import discovery_headers
from .state import SETTINGS

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
JSON = "application/json"


@dataclass(frozen=True)
class ErrorSpec:
    status: int
    type: str
    message: str


_PAYMENT = "payment_required"
_REQUEST = "invalid_request_error"

# The DRAIN reference provider's codes come first, with its statuses; then ours.
ERRORS: dict[str, ErrorSpec] = {
    "voucher_required": ErrorSpec(402, _PAYMENT, "This endpoint is paid: send a signed X-DRAIN-Voucher header."),
    "invalid_voucher_format": ErrorSpec(402, _PAYMENT, "The X-DRAIN-Voucher header is malformed."),
    "insufficient_funds": ErrorSpec(402, _PAYMENT, "The voucher does not cover this request."),
    "invalid_signature": ErrorSpec(402, _PAYMENT, "The voucher signature is not the channel consumer's."),
    "channel_not_found": ErrorSpec(402, _PAYMENT, "The channel does not exist on chain or is closed."),
    "wrong_provider": ErrorSpec(402, _PAYMENT, "The channel belongs to another provider."),
    "model_not_supported": ErrorSpec(400, _REQUEST, "The requested model is not available."),
    "invalid_nonce": ErrorSpec(402, _PAYMENT, "The voucher nonce must be above the last accepted nonce."),
    "invalid_amount": ErrorSpec(402, _PAYMENT, "The voucher amount must not be below the last accepted amount."),
    "exceeds_deposit": ErrorSpec(402, _PAYMENT, "The voucher amount exceeds the channel deposit."),
    "channel_expiring": ErrorSpec(402, _PAYMENT, "The channel expires too soon for this provider to claim in time."),
    "invalid_request": ErrorSpec(400, _REQUEST, "The request body is not valid."),
    "not_found": ErrorSpec(404, _REQUEST, "No such endpoint."),
    "method_not_allowed": ErrorSpec(405, _REQUEST, "Method not allowed on this endpoint."),
    "request_too_large": ErrorSpec(413, _REQUEST, "The request body is too large."),
    "expectation_failed": ErrorSpec(417, _REQUEST, "Only the expectation 100-continue is supported."),
    "request_timeout": ErrorSpec(408, _REQUEST, "The request body did not arrive in time."),
    "rate_limited": ErrorSpec(429, "rate_limit_error", "Too many refused payments from this address; retry later."),
    # 502, or 504 when the upstream timed out: the status tells the two apart.
    "upstream_error": ErrorSpec(502, "upstream_error", "The upstream model provider failed; you were not charged."),
    "unauthorized": ErrorSpec(401, "authentication_error", "A valid admin token is required."),
    "admin_disabled": ErrorSpec(403, "permission_error", "The admin API is disabled."),
    "chain_unavailable": ErrorSpec(503, "service_unavailable", "The blockchain RPC is unavailable; try again shortly."),
    "not_claimer": ErrorSpec(
        409, "conflict_error", "Another instance sharing the ledger is the claimer: ask it (see /health's leader)."
    ),
    # Cooperative close and the channel endpoints (channel_not_found is a 404 there).
    "channel_closing": ErrorSpec(402, _PAYMENT, "A cooperative close was asked for: the channel takes no vouchers."),
    "close_not_supported": ErrorSpec(400, _REQUEST, "The channel's contract (V1) has no cooperative close."),
    "close_pending": ErrorSpec(503, "service_unavailable", "Requests on the channel are still in flight; ask again."),
    "consumer_signature_required": ErrorSpec(
        401, "authentication_error", "This needs the channel consumer's signed request (timestamp, signature)."
    ),
    "invalid_consumer_signature": ErrorSpec(
        401, "authentication_error", "The signed request is malformed, stale or not the channel consumer's."
    ),
    "internal_error": ErrorSpec(500, "server_error", "Internal error; you were not charged."),
}


class ApiError(Exception):
    """A client-visible error raised by a handler."""

    def __init__(
        self, code: str, message: str | None = None, *, status: int | None = None, headers: dict[str, str] | None = None
    ) -> None:
        spec = ERRORS[code]
        self.code = code
        self.message = message or spec.message
        self.status = status or spec.status
        self.headers = headers or {}
        super().__init__(self.message)


# Answered while the body is still (partly) unread: the connection is closed after the answer.
# So is any error answered before the body was read (a paid request whose voucher is refused).
CLOSING_STATUSES = frozenset({408, 413})


class _ClosingResponse(web.Response):
    """A response after which the server sends no more on its connection: our side is shut
    (FIN) as soon as the answer is written, so the client sees the end at once. The rest of a
    body still on its way is read and dropped by aiohttp for a few seconds (a socket closed with
    unread data would be reset, and the client might lose the answer), then the connection goes."""

    def __init__(self, transport: asyncio.Transport | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._transport = transport
        self.force_close()  # Connection: close

    async def write_eof(self, data: bytes = b"") -> None:
        await super().write_eof(data)
        transport = self._transport
        if transport is not None and not transport.is_closing() and transport.can_write_eof():
            transport.write_eof()


def error_response(request: web.Request, error: ApiError) -> web.Response:
    headers = {"X-DRAIN-Error": error.code, **error.headers}
    if error.status == 402:
        headers.update(discovery_headers(request))
    # The standard library's encoder: a message may quote header text, whose undecodable bytes
    # aiohttp hands over as lone surrogates, which it escapes (orjson refuses them).
    text = json.dumps(error_body(error.message, error.code, ERRORS[error.code].type))
    kwargs: dict[str, Any] = {"text": text, "status": error.status, "headers": headers, "content_type": JSON}
    if error.status in CLOSING_STATUSES or request.can_read_body:
        return _ClosingResponse(request.transport, **kwargs)
    return web.Response(**kwargs)


# The codes aiohttp's own HTTP errors are answered with.
HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def too_large(request: web.Request) -> ApiError:
    """413, with the limit the body passed."""
    limit = request.config_dict[SETTINGS].max_body_bytes
    return ApiError("request_too_large", f"The request body is larger than {limit} bytes.")


def _from_http(request: web.Request, exc: web.HTTPException) -> ApiError:
    if exc.status == 413:
        return too_large(request)
    code = HTTP_CODES.get(exc.status, "invalid_request")
    return ApiError(code, ERRORS[code].message, status=exc.status if exc.status in HTTP_CODES else 400)


def client_error(request: web.Request, exc: BaseException) -> ApiError | None:
    """What the client is answered for `exc`, if it is one of the errors a client can cause or
    meet (ours, and aiohttp's HTTP errors); None for anything unexpected."""
    if isinstance(exc, web.HTTPException):
        return _from_http(request, exc) if exc.status >= 400 else None
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, PaymentError):
        return ApiError(exc.code, exc.message, headers=exc.headers)
    if isinstance(exc, RequestError):
        return ApiError(exc.code, exc.message)
    if isinstance(exc, UpstreamError):
        return ApiError("upstream_error", exc.message, status=exc.status)
    return None


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(request, _from_http(request, exc))
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        error = client_error(request, exc)
        if error is None:
            log.exception("unhandled_error method=%s path=%s", request.method, request.path)
            error = ApiError("internal_error")
        return error_response(request, error)
