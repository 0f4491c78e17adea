"""GET /health, /health/live and /health/ready: for the operator, and for a load balancer.

- live: the process serves HTTP (200, nothing else looked at): restart it when this fails.
- ready: requests can be served: the ledger answers a read and a write, and the server is not
  stopping. An RPC that is down does not make it unready: known channels are served from the
  ledger, and new ones get a clear 503 chain_unavailable until it answers again. 503 with the
  reasons when not ready.
- /health: ready's status code, plus what is wrong as `alerts` (status "degraded") and the facts
  behind them: the RPC, the claimer, the gas, the upstream, the books, the payment mode (shadow
  and off are an alert for as long as they are set: nobody should forget them).

Every alert is recomputed from the current state at each request, so it clears as soon as its
cause is gone (a refilled gas account at the next chain poll, a recovered RPC, a claim that went
through), without a restart. No field shows a URL, a key or an upstream's message.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .. import __version__
from ..gas import GasLevel
from ..ledger import ENGINE_ERRORS
from ..reports import money, totals_json
from ..states import PaymentMode
from ..upstream import UpstreamHealth
from .state import CLAIMER, GATE, LEDGER, ROUTES, SETTINGS, STOPPING, WATCHER

routes = web.RouteTableDef()

LEDGER_TIMEOUT = 2.0  # a ledger that takes longer to answer a no-op write cannot serve requests


@dataclass(frozen=True)
class Alert:
    code: str
    message: str

    def as_json(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


async def _ledger_answers(app: web.Application) -> bool:
    """A write (on SQLite: an empty transaction through the writer thread, no fsync) and a read."""
    ledger = app[LEDGER]
    try:
        async with asyncio.timeout(LEDGER_TIMEOUT):
            await ledger.ping()
    except ENGINE_ERRORS:  # (TimeoutError is an OSError)
        return False
    return True


async def _readiness(app: web.Application) -> list[Alert]:
    """Why requests cannot be served now; empty when they can."""
    reasons = []
    if app[STOPPING].is_set():
        reasons.append(Alert("stopping", "The server is shutting down."))
    if not await _ledger_answers(app):
        reasons.append(Alert("ledger_unavailable", "The ledger does not answer: no paid request can be taken."))
    return reasons


def _ago(at: float | None) -> str:
    return "since the start" if at is None else f"for {max(0, int(time.time() - at))} s"


def _alerts(app: web.Application, overdue: dict[str, int] | None) -> list[Alert]:
    """What is wrong besides readiness, from the state of each part now."""
    alerts = []
    watcher, gas = app[WATCHER], app[WATCHER].gas
    if watcher.reachable is False:
        alerts.append(
            Alert(
                "rpc_unreachable",
                f"The chain RPC has not answered {_ago(watcher.last_poll_at)} ({watcher.last_error}): known "
                "channels are served, new ones get 503 chain_unavailable, claims wait.",
            )
        )
    if gas is not None and gas.level is GasLevel.EMPTY:
        alerts.append(
            Alert(
                "insufficient_gas_funds",
                f"The provider account {gas.address} cannot pay for a claim's gas: send it gas tokens.",
            )
        )
    elif gas is not None and gas.level is GasLevel.LOW:
        alerts.append(
            Alert(
                "low_gas",
                f"The provider account {gas.address} holds gas for about {gas.claims_left} claims "
                f"(LOW_GAS_CLAIMS={gas.low_claims}): send it gas tokens.",
            )
        )
    if overdue:
        alerts.append(
            Alert(
                "claims_overdue",
                f"{len(overdue)} channel(s) hold {money(sum(overdue.values()))['usdc']} USDC due for a claim "
                "that has not happened: see the RPC, the gas and the claimer's log.",
            )
        )
    routes = app[ROUTES]
    for name, upstream in routes.upstreams.items():
        if upstream.health.failing:
            which = "The upstream's" if routes.catalog.derived else f"The upstream {name}'s"
            alerts.append(Alert("upstream_failing", f"{which} last call failed ({upstream.health.last_error})."))
    mode = app[SETTINGS].payment_mode
    if mode is PaymentMode.SHADOW:
        shadowed = sum(app[GATE].shadowed.values())
        alerts.append(
            Alert(
                "payment_not_enforced",
                f"PAYMENT_MODE=shadow: requests whose payment is refused are served free ({shadowed} since the "
                "start); set PAYMENT_MODE=enforce to charge them.",
            )
        )
    elif mode is PaymentMode.OFF:
        alerts.append(
            Alert("payment_not_enforced", "PAYMENT_MODE=off: every request is served free, no voucher is read.")
        )
    return alerts


def _upstream_json(health: UpstreamHealth) -> dict[str, Any]:
    return {"lastOkAt": health.last_ok_at, "lastErrorAt": health.last_error_at, "lastError": health.last_error}


def _upstreams_json(app: web.Application) -> tuple[dict[str, Any], dict[str, Any]]:
    """Each upstream's facts by its catalog name (never its URL), and all of them as one, as
    `upstream` has always been: the latest success, the latest failure and what it was."""
    healths = {name: upstream.health for name, upstream in app[ROUTES].upstreams.items()}
    oks = [h.last_ok_at for h in healths.values() if h.last_ok_at is not None]
    failed = [h for h in healths.values() if h.last_error_at is not None]
    latest = max(failed, key=lambda h: h.last_error_at or 0.0, default=None)
    combined = {
        "lastOkAt": max(oks, default=None),
        "lastErrorAt": None if latest is None else latest.last_error_at,
        "lastError": None if latest is None else latest.last_error,
    }
    return combined, {name: _upstream_json(health) for name, health in healths.items()}


@routes.get("/health/live")
async def live(request: web.Request) -> web.Response:
    return web.json_response({"live": True})


@routes.get("/health/ready")
async def ready(request: web.Request) -> web.Response:
    reasons = await _readiness(request.app)
    body = {"ready": not reasons, "reasons": [r.as_json() for r in reasons]}
    return web.json_response(body, status=503 if reasons else 200)


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    app = request.app
    settings, watcher, claimer = app[SETTINGS], app[WATCHER], app[CLAIMER]
    upstream, upstreams = _upstreams_json(app)
    reasons = await _readiness(app)
    books: dict[str, Any] | None = None
    overdue: dict[str, int] | None = None
    if not any(r.code == "ledger_unavailable" for r in reasons):
        try:
            books = totals_json(await app[LEDGER].totals(), watcher.fee_bps)
            overdue = await claimer.overdue()
        except ENGINE_ERRORS:
            reasons.append(Alert("ledger_unavailable", "The ledger does not answer: no paid request can be taken."))
    alerts = reasons + _alerts(app, overdue)
    gas = watcher.gas
    block, block_time = watcher.head or (None, None)
    return web.json_response(
        {
            "status": "degraded" if alerts else "ok",
            "ready": not reasons,
            "alert": alerts[0].code if alerts else None,
            "alerts": [a.as_json() for a in alerts],
            "rpc": {
                "reachable": watcher.reachable,
                "lastPollAt": watcher.last_poll_at,
                "lastBlock": block,
                "lastBlockAgeSeconds": None if block_time is None else max(0, int(time.time() - block_time)),
                "lastError": watcher.last_error,
                "lastErrorAt": watcher.last_error_at,
            },
            "instance": app[LEDGER].instance_id,
            "leader": claimer.leading,
            "claimer": {
                "automatic": settings.claim_interval > 0,
                "lastCycleAt": claimer.last_cycle_at,
                "lastSuccessAt": claimer.last_success_at,
                "overdue": None
                if overdue is None
                else {"channels": len(overdue), "unclaimed": money(sum(overdue.values()))},
            },
            "gas": {
                "balanceWei": None if gas is None or gas.balance is None else str(gas.balance),
                "claimsLeft": None if gas is None else gas.claims_left,
                "lowGasClaims": settings.low_gas_claims,
            },
            "upstream": upstream,
            "upstreams": upstreams,
            "books": books,
            "version": __version__,
            "provider": settings.provider_address,
            "chainId": settings.chain_id,
            "contract": settings.drain_contract,
            "contracts": [
                {"address": c.address, "version": c.version, "feeBps": watcher.fees.get(c.address.lower())}
                for c in settings.contracts
            ],
            "models": len(app[ROUTES].catalog.names),
            "paymentMode": settings.payment_mode,
        },
        status=503 if reasons else 200,
    )
