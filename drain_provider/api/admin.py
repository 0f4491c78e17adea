"""The admin API under /v1/admin/: claims, stats, vouchers, channels. Bearer ADMIN_TOKEN only.

Without ADMIN_TOKEN the whole API answers 403 and says how to turn it on; a missing or wrong
token is 401. The token is compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
from typing import Any

from aiohttp import web

from ..chain import ChainUnavailable
from ..claimer import claim_json, status_report
from ..ledger import ChannelRecord
from .errors import ApiError
from .state import CHAIN, CLAIMER, LEDGER, SETTINGS


def require_admin(request: web.Request) -> None:
    token = request.app[SETTINGS].admin_token
    if token is None:
        raise ApiError(
            "admin_disabled",
            "The admin API is disabled: set ADMIN_TOKEN (16 or more characters) in the environment or .env "
            "and restart, then send it as 'Authorization: Bearer <token>'.",
        )
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise ApiError(
            "unauthorized", "Send 'Authorization: Bearer <ADMIN_TOKEN>'.", headers={"WWW-Authenticate": "Bearer"}
        )


def _channel(record: ChannelRecord) -> dict[str, Any]:
    return {
        "channelId": record.channel_id,
        "consumer": record.consumer,
        "status": record.status,
        "deposit": str(record.deposit),
        "expiry": record.expiry,
        "charged": str(record.charged),
        "reserved": str(record.reserved),
        "claimed": str(record.claimed),
        "unclaimed": str(max(record.charged - record.claimed, 0)),
        "lastVoucher": {"amount": str(record.best_amount), "nonce": str(record.best_nonce)},
    }


async def claim(request: web.Request) -> web.Response:
    require_admin(request)
    force = request.query.get("force", "").lower() in ("1", "true", "yes")
    claimer = request.app[CLAIMER]
    try:
        outcomes = await claimer.cycle(force=force)
    except ChainUnavailable as exc:
        raise ApiError("chain_unavailable", f"The claim cycle could not read the chain: {exc}") from None
    return web.json_response(
        {
            "force": force,
            "claims": [
                {
                    "channelId": o.channel_id,
                    "amount": str(o.amount),
                    "status": o.status,
                    "txHash": o.tx_hash,
                    "error": o.error,
                }
                for o in outcomes
            ],
            "alert": claimer.alert,
        }
    )


async def stats(request: web.Request) -> web.Response:
    require_admin(request)
    app = request.app
    return web.json_response(await status_report(app[SETTINGS], app[LEDGER], app[CHAIN], app[CLAIMER]))


async def vouchers(request: web.Request) -> web.Response:
    require_admin(request)
    best = await request.app[LEDGER].best_vouchers()
    return web.json_response(
        {
            "vouchers": [
                {
                    **voucher.to_json(),
                    "consumer": record.consumer,
                    "charged": str(record.charged),
                    "claimed": str(record.claimed),
                    "status": record.status,
                }
                for record, voucher in best
            ]
        }
    )


async def channels(request: web.Request) -> web.Response:
    require_admin(request)
    return web.json_response({"channels": [_channel(r) for r in await request.app[LEDGER].channels()]})


async def claims(request: web.Request) -> web.Response:
    require_admin(request)
    status = request.query.get("status") or None
    return web.json_response({"claims": [claim_json(r) for r in await request.app[LEDGER].claims(status=status)]})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/admin/claim", claim)
    app.router.add_get("/v1/admin/stats", stats)
    app.router.add_get("/v1/admin/vouchers", vouchers)
    app.router.add_get("/v1/admin/channels", channels)
    app.router.add_get("/v1/admin/claims", claims)
