"""An OpenAI-format upstream that misbehaves at random, with a fixed seed: a proxy in front of a
real one (the demo upstream) that, per request, answers it faithfully or fails in one of the ways
upstreams fail. What it did is counted in `FaultyUpstream.injected`.

JSON answers: an error status (500, 429), a 200 that is not JSON, one larger than the provider
reads (`huge`), one slower than its timeout (`slow`), a connection closed without an answer
(`reset`) or in the middle of one (`truncated`), usage over-reported fifty times, usage left out.
Streams: an error status before the stream, the connection dropped after k events, a stall after
k events longer than the provider waits, an error event after k, an event that is not JSON, more
bytes than the provider reads, an end without [DONE], usage over-reported.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from typing import Any

import aiohttp
from aiohttp import web

JSON_FAULTS = ("ok", "ok", "ok", "ok", "status_500", "status_429", "garbage", "huge", "slow", "reset", "truncated",
               "over_report", "no_usage")  # fmt: skip
STREAM_FAULTS = ("ok", "ok", "ok", "ok", "status_500", "drop", "stall", "error_event", "garbage_event", "huge",
                 "no_done", "over_report")  # fmt: skip


class FaultyUpstream:
    def __init__(self, target: str, *, seed: int, stall_seconds: float, huge_bytes: int) -> None:
        self.target = target.rstrip("/")  # the real upstream's base URL, ending in /v1
        self.rng = random.Random(seed)
        self.stall_seconds = stall_seconds  # longer than the provider's UPSTREAM_TIMEOUT
        self.huge_bytes = huge_bytes  # more than the provider's MAX_ANSWER_BYTES
        self.injected: Counter[str] = Counter()
        self.enabled = True
        self.session: aiohttp.ClientSession | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/{endpoint:.*}", self.handle)
        app.on_cleanup.append(self._close)
        return app

    async def _close(self, app: web.Application) -> None:
        if self.session is not None:
            await self.session.close()

    def _session(self) -> aiohttp.ClientSession:
        if self.session is None:
            self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        return self.session

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = json.loads(raw)
        stream = bool(body.get("stream"))
        fault = self.rng.choice(STREAM_FAULTS if stream else JSON_FAULTS) if self.enabled else "ok"
        self.injected[("stream " if stream else "json ") + fault] += 1
        after = self.rng.randint(0, 8)
        if fault == "status_500" or fault == "status_429":
            error = {"error": {"message": "injected failure", "type": "server_error", "code": None}}
            return web.json_response(error, status=int(fault[-3:]))
        if fault == "garbage":
            return web.Response(body=b"<html>502 Bad Gateway</html>", content_type="application/json")
        if fault == "slow":
            await asyncio.sleep(self.stall_seconds)
        if fault == "reset":
            assert request.transport is not None
            request.transport.close()
            return web.Response()
        upstream = await self._session().post(
            f"{self.target}/{request.match_info['endpoint']}", data=raw, headers={"Content-Type": "application/json"}
        )
        async with upstream:
            try:
                if stream:
                    return await self._stream(request, upstream, fault, after)
                return await self._json(request, upstream, fault)
            except ConnectionResetError:  # the provider stopped reading, as it should past its limit
                return web.Response()

    async def _json(self, request: web.Request, upstream: aiohttp.ClientResponse, fault: str) -> web.StreamResponse:
        data = await upstream.json()
        if fault == "over_report" and "usage" in data:
            data["usage"] = {k: v * 50 for k, v in data["usage"].items()}
        if fault == "no_usage":
            data.pop("usage", None)
        answer = json.dumps(data).encode()
        if fault == "huge":
            answer = answer[:-1] + b', "padding": "' + b"x" * self.huge_bytes + b'"}'
        if fault == "truncated":
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            response.content_length = len(answer)
            await response.prepare(request)
            await response.write(answer[: len(answer) // 2])
            assert request.transport is not None
            request.transport.close()
            return response
        return web.Response(body=answer, status=upstream.status, content_type="application/json")

    async def _stream(
        self, request: web.Request, upstream: aiohttp.ClientResponse, fault: str, after: int
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        buffer = b""
        sent = 0
        async for chunk in upstream.content.iter_any():
            buffer += chunk
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                if sent == after and await self._break(request, response, fault):
                    return response
                if fault == "no_done" and event.strip() == b"data: [DONE]":
                    break
                if fault == "over_report" and b'"usage": {' in event:
                    event = _over_reported(event)
                await response.write(event + b"\n\n")
                sent += 1
        await response.write_eof()
        return response

    async def _break(self, request: web.Request, response: web.StreamResponse, fault: str) -> bool:
        """Misbehave at the chosen event; True when the stream ends here."""
        assert request.transport is not None
        if fault == "drop":
            request.transport.close()
            return True
        if fault == "stall":
            await asyncio.sleep(self.stall_seconds)
            request.transport.close()
            return True
        if fault == "error_event":
            await response.write(b'data: {"error": {"message": "injected overload", "type": "server_error"}}\n\n')
            await response.write_eof()
            return True
        if fault == "garbage_event":
            await response.write(b"data: {not json at all\n\n")
        if fault == "huge":
            piece = b": " + b"x" * 8000 + b"\n\n"
            for _ in range(self.huge_bytes // len(piece) + 2):
                await response.write(piece)
            await response.write_eof()
            return True
        return False


def _over_reported(event: bytes) -> bytes:
    data: dict[str, Any] = json.loads(event[len(b"data: ") :])
    data["usage"] = {k: v * 50 if isinstance(v, int) else v for k, v in data["usage"].items()}
    return b"data: " + json.dumps(data).encode()
