"""`relay.read_until_break`: what an upstream sent before its connection broke is relayed.

aiohttp's `readany` raises a stored connection error before it returns the bytes already in its
buffer. These tests make the race deterministic: a raw HTTP server writes part of a chunked
body and drops the connection, and the client reads only once both the bytes and the break have
reached aiohttp. Plain `readany` loses the bytes; `read_until_break` must not.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest

from drain_provider.relay import read_until_break

EVENTS = b"".join(f'data: {{"n": {i}}}\n\n'.encode() for i in range(6))


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


@pytest.fixture
async def dying_upstream() -> AsyncIterator[str]:
    """An HTTP server that answers a chunked event stream, six events, then cuts the connection
    without the terminating chunk."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(_chunk(EVENTS))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}/"
    server.close()
    await server.wait_closed()


async def _broken_response(session: aiohttp.ClientSession, url: str) -> aiohttp.ClientResponse:
    response = await session.get(url)
    while response.content.exception() is None:  # until the break has reached aiohttp too
        await asyncio.sleep(0.01)
    return response


async def test_plain_readany_loses_what_arrived_before_the_break(dying_upstream: str) -> None:
    """The aiohttp behaviour read_until_break exists for; if this starts failing, aiohttp has
    changed and read_until_break may be simplified."""
    async with aiohttp.ClientSession() as session:
        response = await _broken_response(session, dying_upstream)
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.content.readany()
        response.close()


async def test_bytes_before_the_break_are_read_then_the_error(dying_upstream: str) -> None:
    async with aiohttp.ClientSession() as session:
        response = await _broken_response(session, dying_upstream)
        received = b""
        with pytest.raises(aiohttp.ClientPayloadError):
            async for chunk in read_until_break(response.content):
                received += chunk
        assert received == EVENTS
        response.close()


async def test_a_clean_body_is_read_to_its_end(aiohttp_raw_server) -> None:  # type: ignore[no-untyped-def]
    from aiohttp import web

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for i in range(3):
            await response.write(b"part%d " % i)
        return response

    server = await aiohttp_raw_server(handler)
    async with aiohttp.ClientSession() as session, session.get(server.make_url("/")) as response:
        assert b"".join([chunk async for chunk in read_until_break(response.content)]) == b"part0 part1 part2 "
