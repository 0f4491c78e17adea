"""A JSON-RPC proxy in front of a node that fails calls at random, with a fixed seed (the pattern
of tests/helpers.py's RpcProxy): a 502 without forwarding (`fail`), a 502 after forwarding (`lose`:
the node acted, the caller cannot know; for a sent transaction, the worst case), an answer held
back (`delay`), a 200 that is not JSON-RPC (`garbage`). What it did is counted in `injected`."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import aiohttp
from aiohttp import web

FAULTS = {"fail": 0.08, "lose": 0.05, "delay": 0.05, "garbage": 0.02}


class FaultyRpc:
    def __init__(self, target: str, *, seed: int) -> None:
        self.target = target
        self.rng = random.Random(seed)
        self.injected: Counter[str] = Counter()
        self.enabled = True
        self.session: aiohttp.ClientSession | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/", self.handle)
        app.on_cleanup.append(self._close)
        return app

    async def _close(self, app: web.Application) -> None:
        if self.session is not None:
            await self.session.close()

    def _fault(self) -> str | None:
        if not self.enabled:
            return None
        draw = self.rng.random()
        for fault, share in FAULTS.items():
            if draw < share:
                return fault
            draw -= share
        return None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        fault = self._fault()
        if fault is not None:
            self.injected[fault] += 1
        if fault == "fail":
            return web.Response(status=502, text="injected failure")
        if fault == "garbage":
            return web.Response(text="<html>oops</html>", content_type="application/json")
        if fault == "delay":
            await asyncio.sleep(self.rng.uniform(0.2, 1.5))
        if self.session is None:
            self.session = aiohttp.ClientSession()
        async with self.session.post(self.target, data=body, headers={"Content-Type": "application/json"}) as resp:
            answer = await resp.read()
        if fault == "lose":
            return web.Response(status=502, text="injected: answer lost")
        return web.Response(body=answer, status=resp.status, content_type="application/json")
