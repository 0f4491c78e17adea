"""The aiohttp application: one factory, typed state, and cleanup contexts that own every
connection, session and background task the server uses."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
from aiohttp import web
from eth_account import Account

from .. import checks
from ..chain import ChainClient, ChainClock
from ..chainwatch import ChainWatcher
from ..claimer import Claimer
from ..closing import Closer
from ..config import ConfigError, Settings, load_catalog
from ..gas import GasGauge
from ..instances import keep_alive
from ..ledger import ENGINE_ERRORS
from ..metrics import Metrics
from ..payments import PaymentGate
from ..ratelimit import FailureLimiter
from ..states import PaymentMode
from ..tokens import TokenCounter
from . import channels, completions, embeddings, health, images, info, scrape
from .access import access_middleware, add_request_id
from .admin import create_admin_app
from .body import answer_expect_headers, declared_size
from .cors import add_cors_headers, cors_preflight
from .errors import error_middleware
from .routing import Routes, make_upstreams
from .state import (
    CHAIN,
    CHAINS,
    CLAIMER,
    CLOCK,
    CLOSER,
    COUNTER,
    COUNTING,
    GATE,
    LEDGER,
    LIMITER,
    METRICS,
    ROUTES,
    SESSION,
    SETTINGS,
    STOPPING,
    WATCHER,
)

log = logging.getLogger(__name__)

Context = Callable[[web.Application], AsyncIterator[None]]


# How the provider is served (server.Listener; the tests' TestServer alike). handler_cancellation:
# a client that disconnects cancels its handler at once, which is how a stream learns to drop its
# upstream; shutdown_timeout: how long in-flight requests get to finish on a stop.
RUNNER_OPTIONS: dict[str, Any] = {"handler_cancellation": True, "shutdown_timeout": 15.0}
# While an upstream's last call failed, its GET /models is tried this often, so that /health
# clears its alert when the upstream is back, even with no traffic.
UPSTREAM_PROBE_INTERVAL = 30.0
# While PAYMENT_MODE is not enforce, a WARNING says so this often (and once at start).
PAYMENT_MODE_REMINDER = 600.0
PAYMENT_MODE_NOTES = {
    PaymentMode.SHADOW: "requests whose payment is refused are served free",
    PaymentMode.OFF: "every request is served free, no voucher is read",
}


def create_app(
    settings: Settings, *, chain: ChainClient | None = None, counter: TokenCounter | None = None
) -> web.Application:
    """Build the provider app. `chain` lets `dev` and the tests pass a client for an embedded
    chain (its connection serves every contract of `settings.contracts`); otherwise the app
    connects to `settings.rpc_url` and owns that connection."""
    metrics = Metrics(settings.payment_mode)
    # The access log outermost: it sees every answer as sent, the errors made answers inside it
    # included. Then CORS: a preflight is answered before anything else looks at the request.
    middlewares = [access_middleware(settings, metrics), *([cors_preflight] if settings.cors_origins else [])]
    app = web.Application(
        client_max_size=settings.max_body_bytes, middlewares=[*middlewares, error_middleware, declared_size]
    )
    app.on_response_prepare.append(add_request_id)  # before CORS, which exposes it
    if settings.cors_origins:
        app.on_response_prepare.append(add_cors_headers)
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[COUNTER] = counter or TokenCounter()
    app[LIMITER] = FailureLimiter(settings.payment_failures_per_minute)
    app[STOPPING] = asyncio.Event()
    app.on_shutdown.append(_stopping)
    app.cleanup_ctx.append(
        _all_or_nothing(
            _ledger_ctx,
            _chain_ctx(chain),
            _bound_ledger_ctx,
            _instance_ctx,
            _upstream_ctx,
            _gate_ctx,
            _watcher_ctx,
            _claimer_ctx,
            _tokenizer_ctx,
            _payment_mode_ctx,
            scrape.metrics_listener_ctx,
        )
    )
    app.add_routes(completions.routes)
    app.add_routes(embeddings.routes)
    app.add_routes(images.routes)
    app.add_routes(channels.routes)
    app.add_routes(info.routes)
    app.add_routes(health.routes)
    app.add_routes(scrape.routes)
    app.add_subapp("/v1/admin/", create_admin_app())
    answer_expect_headers(app)
    return app


def _all_or_nothing(*contexts: Context) -> Context:
    """The contexts entered as one: if one fails at start-up, those entered before it are closed.
    aiohttp's run_app does not clean up after a failed start-up, and an open ledger's threads
    would keep the process alive after its one-line error."""

    async def all_contexts(app: web.Application) -> AsyncIterator[None]:
        stack = contextlib.AsyncExitStack()
        try:
            for context in contexts:
                await stack.enter_async_context(contextlib.asynccontextmanager(context)(app))
        except BaseException:
            await stack.aclose()  # a normal exit for each: their cleanup runs after their yield
            raise
        try:
            yield
        finally:
            await stack.aclose()

    return all_contexts


async def _stopping(app: web.Application) -> None:
    app[STOPPING].set()


async def _ledger_ctx(app: web.Application) -> AsyncIterator[None]:
    """The ledger file, opened first (a bad one is found before any slow check); bound to the
    chain by `_bound_ledger_ctx`, once the chain is checked."""
    ledger = await checks.open_unbound_ledger(app[SETTINGS])
    app[LEDGER] = ledger
    yield
    await ledger.close()


async def _bound_ledger_ctx(app: web.Application) -> AsyncIterator[None]:
    """After the chain check: a start refused for its chain id or contract has not bound a new
    ledger to them. What a crash left reserved is released only in a ledger that is ours."""
    await checks.bind_ledger(app[LEDGER], app[SETTINGS])
    await app[LEDGER].start_instance()
    yield


async def _instance_ctx(app: web.Application) -> AsyncIterator[None]:
    """The heartbeat of this instance and the reaping of dead ones (instances.py). Its cleanup
    runs after the requests in flight have finished (aiohttp waits for them before the cleanup
    contexts): then what this instance still holds is released, and it is marked stopped."""
    ledger = app[LEDGER]
    task = asyncio.create_task(keep_alive(ledger, app[SETTINGS].instance_timeout), name="instance-heartbeat")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    try:
        await ledger.stop_instance()
    except ENGINE_ERRORS as exc:  # the others reap it after INSTANCE_TIMEOUT instead
        log.warning("instance_stop_failed instance=%s error=%s", ledger.instance_id, exc)


def _chain_ctx(given: ChainClient | None) -> Context:
    async def chain_ctx(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS]
        primary = settings.contracts[0]
        if given is not None:
            base, owned = given, False
        else:
            assert settings.rpc_url is not None
            base, owned = ChainClient.over_http(settings.rpc_url, primary.address, version=primary.version), True
        # One client per contract served, all on the one connection (one HTTP session).
        chains = tuple(base.for_contract(contract) for contract in settings.contracts)
        try:
            # An RPC that is down is a warning: known channels are served from the ledger, and
            # new ones get a clear 503 until it answers again.
            await checks.require_chain(chains, settings)
        except BaseException:
            if owned:
                await base.close()
            raise
        app[CHAIN] = app[METRICS].chain = chains[0]
        app[CHAINS] = chains
        yield
        if owned:
            await base.close()

    return chain_ctx


async def _upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    # No pool limit: every paid request in flight needs its own upstream connection, and the
    # default cap of 100 would queue the 101st stream behind the others. One session for every
    # upstream: each Upstream sends its own key to its own base URL only.
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    app[SESSION] = session
    app[ROUTES] = app[METRICS].sold = Routes(settings.catalog, make_upstreams(session, settings.catalog, settings))
    probe = asyncio.create_task(_probe_upstreams(app[ROUTES]), name="upstream-probe")
    yield
    probe.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await probe
    await session.close()


async def _probe_upstreams(routes: Routes) -> None:
    """GET /models of every upstream at start, in the background (an upstream that is down must
    not hold the start up, nor stop it: it may come up later), then again of each one whose last
    call failed. The catalog is read at each probe: SIGHUP may have changed it."""
    checks.log_checks(await checks.check_upstreams(routes.catalog, routes.upstreams))
    while True:
        await asyncio.sleep(UPSTREAM_PROBE_INTERVAL)
        catalog, upstreams = routes.catalog, routes.upstreams
        failing = {name: upstream for name, upstream in upstreams.items() if upstream.health.failing}
        if failing:
            await checks.check_upstreams(catalog, failing)


async def _gate_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    chains: tuple[ChainClient, ...] = app[CHAINS]
    app[CLOCK] = ChainClock()
    app[GATE] = PaymentGate(
        app[LEDGER],
        chains,
        settings.chain_id,
        settings.provider_address,
        clock=app[CLOCK],
        min_channel_ttl=settings.min_channel_ttl,
        stopping=app[STOPPING],
        mode=settings.payment_mode,
    )
    app[METRICS].gate = app[GATE]
    app[CLOSER] = Closer(app[GATE], settings.provider_private_key)
    yield


async def _watcher_ctx(app: web.Application) -> AsyncIterator[None]:
    """The chain watcher: the chain clock and the channels closed on chain, every few seconds."""
    settings = app[SETTINGS]
    watcher = ChainWatcher(
        app[LEDGER],
        app[CHAINS],
        app[CLOCK],
        poll_interval=settings.chain_poll_interval,
        on_closed=app[GATE].forget,
        gas=GasGauge(settings.provider_address, settings.low_gas_claims),
    )
    app[WATCHER] = app[METRICS].watcher = watcher
    task = asyncio.create_task(watcher.run(), name="chain-watcher")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _claimer_ctx(app: web.Application) -> AsyncIterator[None]:
    """The background claimer: started with the server, cancelled with it (a claim cut off
    mid-way is reconciled at the next start)."""
    settings = app[SETTINGS]
    account = Account.from_key(settings.provider_private_key)
    claimer = Claimer(app[LEDGER], app[CHAIN], account, settings, app[WATCHER])
    app[CLAIMER] = app[METRICS].claimer = claimer
    # Only while this instance is the claimer (one among those sharing a PostgreSQL ledger).
    # CLAIM_INTERVAL=0: no automatic claims (POST /v1/admin/claim or the CLI instead), but what
    # a previous run left pending is still reconciled once this instance leads.
    task = asyncio.create_task(claimer.run(), name="claimer")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _tokenizer_ctx(app: web.Application) -> AsyncIterator[None]:
    # Loading an encoding may download it: do it once, off the event loop, before serving.
    await asyncio.to_thread(app[COUNTER].warm_up, app[SETTINGS].catalog.routes)
    # Large inputs are counted on threads of their own (tiktoken releases the GIL), all cores but
    # the event loop's: not the default executor, which aiohttp's DNS lookups queue on.
    pool = ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 2) - 1), thread_name_prefix="counting")
    app[COUNTING] = pool
    yield
    pool.shutdown(wait=False, cancel_futures=True)


async def _payment_mode_ctx(app: web.Application) -> AsyncIterator[None]:
    """PAYMENT_MODE shadow or off is loud: a WARNING at start and every PAYMENT_MODE_REMINDER."""
    mode = app[SETTINGS].payment_mode
    if mode is PaymentMode.ENFORCE:
        yield
        return

    def warn() -> None:
        shadowed = sum(app[GATE].shadowed.values())
        log.warning("payment_not_enforced mode=%s shadowed=%d note=%s", mode, shadowed, PAYMENT_MODE_NOTES[mode])

    async def remind() -> None:
        while True:
            await asyncio.sleep(PAYMENT_MODE_REMINDER)
            warn()

    warn()
    task = asyncio.create_task(remind(), name="payment-mode-reminder")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def reload_prices(app: web.Application, env: Mapping[str, str]) -> None:
    """SIGHUP: the catalog again, from `MODELS_FILE` (models, prices, aliases, upstreams: a new
    or changed upstream gets a new client on the same session), or without it the prices from
    `PRICING_FILE` and the `PRICE_` variables of `env`. New models' encodings are loaded before
    they are served; a bad file or setting keeps what is served and says why in one line."""
    try:
        catalog = load_catalog(env, app[SETTINGS])
    except ConfigError as exc:
        log.warning("prices_reload_failed error=%s", exc)
        return
    await asyncio.to_thread(app[COUNTER].warm_up, catalog.routes)
    app[ROUTES].reload(catalog, app[SESSION], app[SETTINGS])
    log.info(
        "prices_reloaded models=%d names=%d upstreams=%d",
        len(catalog.routes),
        len(catalog.names),
        len(catalog.upstreams),
    )
