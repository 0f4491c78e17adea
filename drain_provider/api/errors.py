"""Error responses: an OpenAI-style JSON body, the `X-DRAIN-Error` code, the right status.

The middleware is the last line of defence for "bad input never produces a 500 or a
traceback": aiohttp's own HTTP errors (404, 405, 413) get our body, and anything unexpected is
logged with its traceback and answered with a generic 500 that reveals nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from ..payments import PaymentError
from ..protocol import ERRORS
from .state import SETTINGS

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


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


def base_url(request: web.Request) -> str:
    configured = request.app[SETTINGS].public_url
    return configured or f"{request.scheme}://{request.host}"


def discovery_headers(request: web.Request) -> dict[str, str]:
    """What DRAIN clients read from a 402 to find out how to pay."""
    settings = request.app[SETTINGS]
    root = base_url(request)
    return {
        "X-Payment-Protocol": f"drain-{settings.contract_version}",
        "X-Payment-Provider": settings.provider_address,
        "X-Payment-Contract": settings.drain_contract,
        "X-Payment-Chain": str(settings.chain_id),
        "X-Payment-Signing": f"{root}/v1/signing",
        "X-Payment-Docs": f"{root}/v1/docs",
    }


def error_response(request: web.Request, error: ApiError) -> web.Response:
    spec = ERRORS[error.code]
    headers = {"X-DRAIN-Error": error.code, **error.headers}
    if error.status == 402:
        headers.update(discovery_headers(request))
    body = {"error": {"message": error.message, "type": spec.type, "code": error.code}}
    return web.json_response(body, status=error.status, headers=headers)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(request, exc)
    except PaymentError as exc:
        return error_response(request, ApiError(exc.code, exc.message, headers=exc.headers))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "invalid_request")
        message = ERRORS[code].message
        if exc.status == 413:
            message = f"The request body is larger than {request.app[SETTINGS].max_body_bytes} bytes."
        return error_response(request, ApiError(code, message, status=exc.status if exc.status in _HTTP_CODES else 400))
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unhandled_error method=%s path=%s", request.method, request.path)
        return error_response(request, ApiError("internal_error"))
