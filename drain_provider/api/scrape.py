"""GET /metrics: on the main port behind the admin token, and, with METRICS_PORT, on a listener of
its own without one.

A Prometheus server scraping the public port would have to hold the admin token; one on a
private network is given METRICS_PORT instead, bound to METRICS_HOST (127.0.0.1 by default): a
second aiohttp site of a tiny app that serves nothing else, started and stopped with the main app
(its cleanup context). The main port's /metrics keeps asking for the token either way.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from ..config import ConfigError
from ..metrics import CONTENT_TYPE, Metrics
from .admin import check_admin_token
from .state import METRICS, SETTINGS

routes = web.RouteTableDef()


def _answer(metrics: Metrics) -> web.Response:
    response = web.Response(body=metrics.render())
    response.headers["Content-Type"] = CONTENT_TYPE
    return response


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    check_admin_token(request)
    return _answer(request.app[METRICS])


def _metrics_app(metrics: Metrics) -> web.Application:
    async def scrape(request: web.Request) -> web.Response:
        return _answer(metrics)

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    return app


async def metrics_listener_ctx(app: web.Application) -> AsyncIterator[None]:
    """METRICS_PORT's listener, for as long as the app serves."""
    settings = app[SETTINGS]
    if settings.metrics_port is None:
        yield
        return
    runner = web.AppRunner(_metrics_app(app[METRICS]), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.metrics_host, settings.metrics_port).start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(
            f"METRICS_PORT: cannot listen on {settings.metrics_host}:{settings.metrics_port} ({exc.strerror})"
        ) from None
    try:
        yield
    finally:
        await runner.cleanup()
