"""The serving loop in-process (`server.Listener`, what `serve` and `dev` run): request heads
that never finish are closed, connections past MAX_CONNECTIONS are turned away while the open
ones keep working, malformed requests are one quiet line each, a busy port is a ConfigError."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers import ChannelFactory, Upstream, fresh_bad_request_budget, make_settings, paid_chat, wait_for
from openai import AsyncOpenAI

from drain_provider.api import create_app
from drain_provider.api.state import SETTINGS
from drain_provider.config import ConfigError
from drain_provider.devtools.devchain import DevChain
from drain_provider.logs import BAD_REQUEST_LINES
from drain_provider.server import Listener

Listen = Callable[..., Awaitable[Listener]]


@pytest.fixture
async def listen(chain: DevChain, upstream: Upstream, tmp_path: Path) -> AsyncIterator[Listen]:
    """A provider served by `Listener` on a free port; `overrides` replace Settings fields."""
    started: list[Listener] = []

    async def start(port: int = 0, **overrides: Any) -> Listener:
        settings = make_settings(chain, upstream.url, tmp_path / f"ledger{len(started)}.db", **overrides)
        app = create_app(settings, chain=chain.client())
        listener = Listener(
            app,
            "127.0.0.1",
            port,
            max_connections=settings.max_connections,
            header_timeout=settings.header_timeout,
        )
        started.append(listener)
        await listener.start()
        return listener

    yield start
    for listener in started:
        await listener.stop()


async def closed_by_server(reader: asyncio.StreamReader, timeout: float = 5.0) -> bool:
    """True once the server closes the connection (EOF or reset) without answering."""
    try:
        return await asyncio.wait_for(reader.read(), timeout) == b""
    except ConnectionError:
        return True


async def test_a_request_head_that_never_completes_is_closed_after_header_timeout(listen: Listen) -> None:
    listener = await listen(header_timeout=1.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
    opened = time.monotonic()
    sent = 0

    async def trickle() -> None:  # slowloris: a byte of a never-ending header every 0.2 s
        nonlocal sent
        with contextlib.suppress(ConnectionError):
            for byte in b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
                writer.write(bytes([byte]))
                await writer.drain()
                sent += 1
                await asyncio.sleep(0.2)

    trickling = asyncio.create_task(trickle())
    try:
        assert await closed_by_server(reader)
    finally:
        trickling.cancel()
        writer.close()
    elapsed = time.monotonic() - opened
    assert 0.9 <= elapsed < 2.5, elapsed
    assert sent >= 4  # the bytes it kept sending did not keep it open
    # A client that sends its request in time is served, on the same server.
    async with aiohttp.ClientSession() as session, session.get(f"{listener.url}/v1/models") as resp:
        assert resp.status == 200


async def test_stalled_connections_past_the_cap_do_not_stop_a_paid_request(
    listen: Listen, open_channel: ChannelFactory
) -> None:
    listener = await listen(max_connections=10, header_timeout=2.5)
    consumer = await open_channel(listener.app[SETTINGS].provider_address)
    client = AsyncOpenAI(base_url=f"{listener.url}/v1", api_key="unused", max_retries=0)
    try:
        await client.models.list()  # the client's connection is open, kept alive in its pool
        stalled = []
        for _ in range(60):  # 9 fill the cap, 51 more are turned away
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
            writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")  # and never finish
            stalled.append((reader, writer))
        await wait_for(lambda: listener.cap.refused >= 51)
        assert listener.cap.open == 10

        raw = await paid_chat(client, consumer)  # on the connection it already had
        assert int(raw.headers["X-DRAIN-Cost"]) > 0

        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        assert await closed_by_server(reader)  # a new one, while full: closed, not queued
        writer.close()

        # HEADER_TIMEOUT frees the cap; new clients are served again.
        await wait_for(lambda: listener.cap.open <= 1, timeout=6)
        async with aiohttp.ClientSession() as session, session.get(f"{listener.url}/v1/models") as resp:
            assert resp.status == 200
        for _, writer in stalled:
            writer.close()
    finally:
        await client.close()


MALFORMED = [
    b"GARBAGE\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(64)),  # a TLS hello
    b"GET / HTTP/1.1\r\nHost: x\r\nno colon in this header\r\n\r\n",
    b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: " + b"b" * 9000 + b"\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
    b"GET / HTTP/7.3\r\n\r\n",
]


async def test_malformed_requests_are_quiet_bounded_lines_and_the_server_still_serves(
    listen: Listen, caplog: pytest.LogCaptureFixture
) -> None:
    listener = await listen()
    fresh_bad_request_budget()

    async def send(data: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        try:
            writer.write(data)
            return await asyncio.wait_for(reader.read(), 5)
        except ConnectionError:
            return b""
        finally:
            writer.close()

    with caplog.at_level(logging.DEBUG):
        for batch in range(10):
            answers = await asyncio.gather(*(send(MALFORMED[(batch + i) % len(MALFORMED)]) for i in range(20)))
            assert all(a == b"" or a.split(b" ", 2)[1] == b"400" for a in answers), answers
        async with aiohttp.ClientSession() as session, session.get(f"{listener.url}/v1/models") as resp:
            assert resp.status == 200

    # What the requests caused (the app's own start-up may log: an unfunded provider's gas_empty).
    about_requests = [r for r in caplog.records if r.name.startswith(("aiohttp", "drain_provider.logs"))]
    assert not [r for r in about_requests if r.levelno >= logging.ERROR], caplog.text
    assert not [r for r in caplog.records if r.exc_info], caplog.text
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("bad_http_request")]
    assert 1 <= len(lines) <= BAD_REQUEST_LINES, lines
    assert all(len(line) < 250 for line in lines), lines
    assert "a" * 120 not in caplog.text and "b" * 120 not in caplog.text


async def test_a_busy_port_is_a_one_line_config_error(listen: Listen) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(ConfigError, match=r"^PORT: cannot listen on 127\.0\.0\.1:\d+ "):
            await listen(port=busy.getsockname()[1])


async def test_stop_closes_the_listening_socket(listen: Listen) -> None:
    listener = await listen()
    await listener.stop()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", listener.port)
