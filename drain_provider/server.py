"""Serving the app: bind, cap the connections, time out request heads, stop on a signal.

aiohttp's `run_app` does none of the first three the way a public server needs: it accepts
connections until the process runs out of file descriptors, keeps a connection that trickles its
headers open for as long as its keep-alive (75 s), and on SIGHUP dies at once. Here:

- at most `max_connections` client connections are open at once; one more is closed as soon as
  it is accepted (`ConnectionCap`), so a flood cannot take the descriptors the ledger, the
  upstream and the connections already open need. The soft RLIMIT_NOFILE is raised at start to
  what the cap needs.
- a connection must send a complete request head within `header_timeout` seconds. aiohttp's
  keep-alive timer does exactly that: it starts when the connection is made (and again after
  each response), bytes of a partial head do not reset it, and it closes the connection if no
  complete request has arrived when it fires. So the timeout is passed as `keepalive_timeout`,
  and is also how long an idle keep-alive connection is kept.
- SIGTERM and SIGINT stop gracefully (in-flight requests get `shutdown_timeout`), also during
  start-up, which they cut short; SIGHUP calls the server's reload hook (prices).

The event loop and the end of the process are `process.py`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import resource
import signal
from collections.abc import Awaitable, Callable
from typing import cast

from aiohttp import web

from .api import RUNNER_OPTIONS
from .config import ConfigError
from .logs import RateLimit, quiet_bad_requests

log = logging.getLogger(__name__)

Hook = Callable[[], Awaitable[None]]

# Besides its socket, a client connection may hold an upstream connection; the ledger, the
# chain client, the tokenizer and Python itself need some more.
FDS_PER_CONNECTION = 2
FDS_RESERVED = 128


# --- the connection cap -----------------------------------------------------------------------


class ConnectionCap:
    """Counts the open client connections and turns away those past `limit`.

    It wraps the protocol factory that `loop.create_server` is given (aiohttp's `web.Server`):
    each accepted connection is counted from the moment its protocol is made (before asyncio
    calls `connection_made`, so a burst accepted in one loop turn cannot overshoot) until its
    `connection_lost`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0
        self.refused = 0
        self._log_limit = RateLimit(10, 10.0)

    def wrap(self, make: Callable[[], asyncio.BaseProtocol]) -> Callable[[], asyncio.BaseProtocol]:
        def protocol() -> asyncio.BaseProtocol:
            if self.open >= self.limit:
                self.refused += 1
                return _Refused(self)
            self.open += 1
            return _Counted(make(), self)

        return protocol

    def closed(self) -> None:
        self.open -= 1

    def log_refusal(self) -> None:
        allowed, suppressed = self._log_limit.allow()
        if allowed:
            log.warning(
                "connection_refused reason=max_connections limit=%d refused=%d%s",
                self.limit,
                self.refused,
                f" suppressed={suppressed}" if suppressed else "",
            )


class _Counted(asyncio.Protocol):
    """aiohttp's protocol for one connection, unchanged but for the count."""

    __slots__ = ("_cap", "_inner")

    def __init__(self, inner: asyncio.BaseProtocol, cap: ConnectionCap) -> None:
        assert isinstance(inner, asyncio.Protocol)
        self._inner = inner
        self._cap = cap

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cap.closed()
        self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class _Refused(asyncio.Protocol):
    """A connection over the cap: closed at once, its descriptor freed, nothing read."""

    def __init__(self, cap: ConnectionCap) -> None:
        self._cap = cap

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).abort()
        self._cap.log_refusal()


def raise_fd_limit(max_connections: int) -> None:
    """Raise the soft limit of open files to what `max_connections` needs, up to the hard limit
    (raising it needs no privilege): distributions start processes at 1024, which the default
    cap alone would pass."""
    needed = max_connections * FDS_PER_CONNECTION + FDS_RESERVED
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("fd_limit_unchanged soft=%d wanted=%d error=%s", soft, target, exc)
            target = soft
        else:
            log.info("fd_limit_raised from=%d to=%d", soft, target)
    if target < needed:
        # The hard limit is the operator's: LimitNOFILE= in a systemd unit, `ulimit -Hn` in a shell.
        log.warning("fd_limit_low limit=%d needed=%d max_connections=%d", target, needed, max_connections)


# --- the listener -----------------------------------------------------------------------------


class Listener:
    """The app, started and listening on `host:port` with the cap and the header timeout.

    `start` runs the app's start-up (ledger, chain, tokenizer) and binds; `stop` closes the
    listening socket, lets in-flight requests finish (`shutdown_timeout`), and runs the app's
    cleanup. `stop` is safe after a failed or cancelled `start`."""

    def __init__(
        self, app: web.Application, host: str, port: int, *, max_connections: int, header_timeout: float
    ) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.cap = ConnectionCap(max_connections)
        self.header_timeout = header_timeout
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        raise_fd_limit(self.cap.limit)
        quiet_bad_requests()
        self._runner = web.AppRunner(self.app, access_log=None, keepalive_timeout=self.header_timeout, **RUNNER_OPTIONS)
        await self._runner.setup()
        handlers = self._runner.server
        assert handlers is not None
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(self.cap.wrap(handlers), self.host, self.port)
        except OSError as exc:
            if exc.errno not in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
                raise
            raise ConfigError(f"PORT: cannot listen on {self.host}:{self.port} ({exc.strerror})") from None
        self.port = self._server.sockets[0].getsockname()[1]
        log.info(
            "listening url=%s max_connections=%d header_timeout=%g",
            self.url,
            self.cap.limit,
            self.header_timeout,
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()  # no new connections; the open ones are the runner's to end
            self._server = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


# --- signals ----------------------------------------------------------------------------------


class Signals:
    """SIGTERM and SIGINT ask for a graceful stop. SIGHUP runs `on_hangup` (one run at a time; a
    SIGHUP during a run, or during start-up, runs it again after); without a hook it stops too,
    as a terminal's hangup would."""

    def __init__(self, on_hangup: Hook | None = None) -> None:
        self.stop = asyncio.Event()
        self._on_hangup = on_hangup
        self._serving = False
        self._pending = False
        self._running: asyncio.Task[None] | None = None

    def __enter__(self) -> Signals:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, self._stop, "SIGINT")
        loop.add_signal_handler(signal.SIGHUP, self._hangup)
        return self

    def __exit__(self, *exc: object) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)

    def _stop(self, name: str) -> None:
        if not self.stop.is_set():
            log.info("stopping signal=%s", name)
            self.stop.set()

    def _hangup(self) -> None:
        if self._on_hangup is None:
            self._stop("SIGHUP")
        elif not self._serving or self._running is not None:
            self._pending = True
        else:
            self._running = asyncio.create_task(self._run_hook(self._on_hangup), name="sighup")

    async def _run_hook(self, hook: Hook) -> None:
        try:
            await hook()
        except Exception:
            log.exception("sighup_failed")
        finally:
            self._running = None
            if self._pending:
                self._pending = False
                self._hangup()

    def serving(self) -> None:
        """Start-up is over: a SIGHUP that came during it runs now."""
        self._serving = True
        if self._pending:
            self._pending = False
            self._hangup()

    async def unless_stopped(self, awaitable: Awaitable[None]) -> bool:
        """Await `awaitable`, unless a stop signal comes first: then it is cancelled (its own
        cleanup runs) and this returns False."""
        task = asyncio.ensure_future(awaitable)
        waiting = asyncio.ensure_future(self.stop.wait())
        try:
            await asyncio.wait({task, waiting}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiting.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if task.cancelled():
            return False
        task.result()  # a failed start-up raises here
        return True

    async def wait(self) -> None:
        await self.stop.wait()
        if self._running is not None:
            await self._running


async def serve(listener: Listener, *, on_hangup: Hook | None = None) -> None:
    """Serve until SIGTERM or SIGINT; a signal during start-up cuts it short, and what had
    started is closed. Start-up errors (a ConfigError) propagate after the same cleanup."""
    with Signals(on_hangup) as signals:
        try:
            if await signals.unless_stopped(listener.start()):
                signals.serving()
                await signals.wait()
        finally:
            await listener.stop()
