"""The admin API, a sub-application mounted at /v1/admin/: claims, stats, vouchers, channels, usage.

Its own middleware lets through only `Authorization: Bearer <ADMIN_TOKEN>` (compared in constant
time, never logged). Without ADMIN_TOKEN the whole API answers 403 and says how to turn it on;
a missing or wrong token is 401. Handlers read the provider's state through
`request.config_dict`, which looks through to the main application.
"""

from __future__ import annotations

import hmac
from dataclasses import replace

from aiohttp import web

from .. import reports, usage_view
from ..chain import ChainUnavailable
from ..claimer import NotLeader
from ..states import ClaimStatus
from .body import answer_expect_headers
from .errors import ApiError, Handler
from .state import CHAIN, CLAIMER, LEDGER, SETTINGS, WATCHER

routes = web.RouteTableDef()


@web.middleware
async def require_admin_token(request: web.Request, handler: Handler) -> web.StreamResponse:
    check_admin_token(request)
    return await handler(request)


def check_admin_token(request: web.Request) -> None:
    """ApiError unless the request carries the admin token (the admin API, and /metrics on the
    main port)."""
    token = request.config_dict[SETTINGS].admin_token
    if token is None:
        raise ApiError(
            "admin_disabled",
            "The admin API is disabled: set ADMIN_TOKEN (16 or more characters) in the environment or .env "
            "and restart, then send it as 'Authorization: Bearer <token>'.",
        )
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    # The bytes the client sent: aiohttp hands undecodable ones over as lone surrogates.
    sent = given.strip().encode("utf-8", "surrogateescape")
    if scheme.lower() != "bearer" or not hmac.compare_digest(sent, token.encode("utf-8", "surrogateescape")):
        raise ApiError(
            "unauthorized", "Send 'Authorization: Bearer <ADMIN_TOKEN>'.", headers={"WWW-Authenticate": "Bearer"}
        )


@routes.post("/claim")
async def claim(request: web.Request) -> web.Response:
    force = request.query.get("force", "").lower() in ("1", "true", "yes")
    claimer = request.config_dict[CLAIMER]
    try:
        outcomes = await claimer.cycle(force=force)
    except ChainUnavailable as exc:
        raise ApiError("chain_unavailable", f"The claim cycle could not read the chain: {exc}") from None
    except NotLeader:
        raise ApiError("not_claimer") from None
    return web.json_response(reports.cycle_report(outcomes, force=force, alert=claimer.alert))


@routes.get("/stats")
async def stats(request: web.Request) -> web.Response:
    state = request.config_dict
    report = await reports.status_report(state[SETTINGS], state[LEDGER], state[CHAIN], state[CLAIMER], state[WATCHER])
    return web.json_response(report)


@routes.get("/vouchers")
async def vouchers(request: web.Request) -> web.Response:
    last = await request.config_dict[LEDGER].last_vouchers()
    return web.json_response({"vouchers": [reports.last_voucher_json(record, voucher) for record, voucher in last]})


@routes.get("/channels")
async def channels(request: web.Request) -> web.Response:
    records = await request.config_dict[LEDGER].channels()
    return web.json_response({"channels": [reports.channel_json(record) for record in records]})


@routes.get("/claims")
async def claims(request: web.Request) -> web.Response:
    raw = request.query.get("status") or None
    if raw is not None and raw not in set(ClaimStatus):
        raise ApiError("invalid_request", f"'status' must be one of {', '.join(ClaimStatus)}.")
    records = await request.config_dict[LEDGER].claims(status=ClaimStatus(raw) if raw else None)
    return web.json_response({"claims": [reports.claim_json(record) for record in records]})


@routes.get("/usage")
async def usage(request: web.Request) -> web.Response:
    """Every channel's paid requests, newest first, filtered and paged (usage_view.py)."""
    try:
        wanted = usage_view.parse_filter(request.query)
    except usage_view.UsageQueryError as exc:
        raise ApiError("invalid_request", str(exc)) from None
    rows = await request.config_dict[LEDGER].usage_page(replace(wanted, limit=wanted.limit + 1))
    return web.json_response(usage_view.page_json(rows, wanted))


def create_admin_app() -> web.Application:
    app = web.Application(middlewares=[require_admin_token])
    app.add_routes(routes)
    answer_expect_headers(app)
    return app
