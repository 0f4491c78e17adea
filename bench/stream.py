"""Streaming figures: time to first token added over calling the upstream directly, and the
relay's CPU per streamed token event, for the pass-through proxy and for drain-provider.

CPU per token event is a slope: the same number of streams is run twice, with long and with
short answers, and the difference in server CPU is divided by the difference in token events.
What a request costs whatever its length (voucher, ledger, connection) cancels out.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from typing import Any

import aiohttp

from drain_provider.consumer import DrainConsumer

from .harness import Rig, Server, percentile

TOKEN_RATE_DELAY = 0.02  # 50 tokens/s per stream, a realistic model's pace


def reply_of(tokens: int) -> str:
    return "word" + " word" * (tokens - 1)  # one cl100k token per word


def body_for(tokens: int, delay: float) -> dict[str, Any]:
    directive = "!demo " + json.dumps({"reply": reply_of(tokens), "token_delay": delay})
    return {
        "model": "demo",
        "messages": [{"role": "user", "content": directive}],
        "stream": True,
        "max_tokens": tokens + 10,
    }


def voucher_headers(consumer: DrainConsumer, count: int, budget: int) -> list[dict[str, str]]:
    """Pre-signed vouchers, each `budget` above the last (signing is the client's work, not what
    we measure)."""
    return [{"X-DRAIN-Voucher": consumer.sign(consumer.amount + budget).header_value()} for _ in range(count)]


async def stream_once(session: aiohttp.ClientSession, url: str, body: dict[str, Any], headers: dict[str, str]) -> float:
    """One streaming request read to the end; seconds to the first content token."""
    started = time.perf_counter()
    first = 0.0
    async with session.post(url, json=body, headers=headers) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{url}: {resp.status} {await resp.text()}")
        async for line in resp.content:
            if not first and b'"content": "w' in line:
                first = time.perf_counter() - started
    return first


def _url(server: Server | str) -> str:
    base = server.url if isinstance(server, Server) else server
    return base + "/v1/chat/completions"


async def time_to_first_token(rig: Rig, requests: int) -> dict[str, list[float]]:
    """Sequential requests, the three paths interleaved so drift hits them alike."""
    body = body_for(20, 0)
    paid = voucher_headers(rig.consumers[0], requests, budget=2_000)
    results: dict[str, list[float]] = {"direct": [], "passthrough": [], "drain-provider": []}
    async with aiohttp.ClientSession() as session:
        for _ in range(3):  # warm-up: connections, tokenizer, channel cache
            await stream_once(session, _url(rig.upstream), body, {})
            await stream_once(session, _url(rig.passthrough), body, {})
        await stream_once(session, _url(rig.provider), body, paid[0])
        for headers in paid[1:]:
            results["direct"].append(await stream_once(session, _url(rig.upstream), body, {}))
            results["passthrough"].append(await stream_once(session, _url(rig.passthrough), body, {}))
            results["drain-provider"].append(await stream_once(session, _url(rig.provider), body, headers))
    return results


async def _wave(server: Server, rig: Rig, streams: int, tokens: int, paid: bool) -> float:
    """`streams` concurrent streams of `tokens` tokens; the server CPU seconds they took."""
    body = body_for(tokens, TOKEN_RATE_DELAY)
    headers = [voucher_headers(consumer, 1, budget=2_000)[0] if paid else {} for consumer in rig.consumers[:streams]]
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        before = server.cpu_seconds()
        await asyncio.gather(*(stream_once(session, _url(server), body, h) for h in headers))
        return server.cpu_seconds() - before


async def relay_cpu_per_event(rig: Rig, streams: int, long: int, short: int, rounds: int) -> dict[str, float]:
    """Microseconds of server CPU per token event, for the proxy and for drain-provider; the two
    servers take turns in every round, so that the machine's drift hits both."""
    servers = ((rig.passthrough, False), (rig.provider, True))
    cpu = {server.name: 0.0 for server, _ in servers}
    for server, paid in servers:
        await _wave(server, rig, streams, short, paid)  # warm-up
    for _ in range(rounds):
        for server, paid in servers:
            cpu[server.name] += await _wave(server, rig, streams, long, paid)
            cpu[server.name] -= await _wave(server, rig, streams, short, paid)
    events = rounds * streams * (long - short)
    return {name: spent / events * 1e6 for name, spent in cpu.items()}


async def run(rig: Rig, *, quick: bool) -> dict[str, Any]:
    ttft = await time_to_first_token(rig, 30 if quick else 200)
    cpu = await relay_cpu_per_event(
        rig, streams=min(32, len(rig.consumers)), long=100 if quick else 250, short=10, rounds=1 if quick else 3
    )
    medians = {path: statistics.median(values) * 1000 for path, values in ttft.items()}
    p99 = {path: percentile(values, 0.99) * 1000 for path, values in ttft.items()}
    return {
        "ttft_ms_p50": medians,
        "ttft_ms_p99": p99,
        "ttft_added_ms_p50": {p: medians[p] - medians["direct"] for p in ("passthrough", "drain-provider")},
        "relay_cpu_us_per_token_event": cpu,
        "relay_cpu_ratio_vs_passthrough": cpu["drain-provider"] / cpu["passthrough"] if cpu["passthrough"] else None,
    }
