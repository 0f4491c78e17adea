"""Upstream and RPC faults under concurrent paid load: the provider's upstream is a proxy that
fails at random (faulty_upstream.py: error statuses, garbage, huge and slow answers, streams
dropped, stalled or broken mid-way), its RPC another (faulty_rpc.py: calls failed, answers lost
or held back), while clients pay for JSON answers and streams and the claimer claims.

    python -m tests.reliability.faults --requests 2000

Invariants: every request settled exactly once. From the ledger file: no usage row left
`reserved`; none both charged and released; every channel's charged total the sum of its
requests' costs; one request per voucher. Against the clients: the X-DRAIN-Cost every client was
told adds up, per channel, to the ledger's charged total, and every 200 told its cost; no answer
was a 500 (an upstream's failure is a 502 or 504); no traceback in the provider's log. The claims
are held to the chain as in kill9, once the faults stop.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections import Counter
from typing import Any

import aiohttp
from aiohttp import web

from bench.harness import free_port
from drain_provider.consumer import DrainConsumer

from . import audit, report
from .faulty_rpc import FaultyRpc
from .faulty_upstream import FaultyUpstream
from .paying import Outcome, chat_body, send, step_voucher
from .rig import Rig, build

STEP = 2_000
UPSTREAM_TIMEOUT = 0.5
MAX_ANSWER_BYTES = 65_536
SETTINGS = {
    "UPSTREAM_TIMEOUT": str(UPSTREAM_TIMEOUT),
    "MAX_ANSWER_BYTES": str(MAX_ANSWER_BYTES),
    "CLAIM_INTERVAL": "0.5",
    "CLAIM_THRESHOLD": "300",
    "GAS_TOKEN_PRICE": "0",
    "CLAIM_RETRY_SECONDS": "1",
    "CHAIN_POLL_INTERVAL": "1",
    "LOG_LEVEL": "INFO",
}


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


async def lane(
    session: aiohttp.ClientSession, rig: Rig, consumer: DrainConsumer, rng: random.Random, count: int
) -> list[Outcome]:
    outcomes = []
    for i in range(count):
        stream = rng.random() < 0.5
        body = chat_body(f"Request {i} of a client under faults.", stream=stream, max_tokens=rng.randint(16, 64))
        outcomes.append(await send(session, rig.url, step_voucher(consumer, STEP), body))
    return outcomes


async def run(
    requests: int, *, clients: int = 8, seed: int = 1, env: dict[str, str] | None = None, keep: bool = False
) -> dict[str, Any]:
    rig = await build(clients, env={**SETTINGS, **(env or {})})
    upstream = FaultyUpstream(
        rig.demo.url + "/v1", seed=seed, stall_seconds=UPSTREAM_TIMEOUT * 2, huge_bytes=2 * MAX_ANSWER_BYTES
    )
    rpc = FaultyRpc(rig.anvil.url, seed=seed)
    runners: list[web.AppRunner] = []
    try:
        upstream_runner, upstream_url = await serve(upstream.app())
        rpc_runner, rpc_url = await serve(rpc.app())
        runners += [upstream_runner, rpc_runner]
        await rig.start_provider(UPSTREAM_BASE_URL=upstream_url + "/v1", RPC_URL=rpc_url)
        started = time.perf_counter()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            per_lane = max(requests // clients, 1)
            lanes = [lane(session, rig, c, random.Random(f"{seed}-{i}"), per_lane) for i, c in enumerate(rig.consumers)]
            outcomes = [o for batch in await asyncio.gather(*lanes) for o in batch]
        seconds = time.perf_counter() - started
        upstream.enabled = rpc.enabled = False  # the faults stop; a start that only finishes what was left
        rig.stop_provider()
        await rig.start_at_rest()
        rig.stop_provider()
        result = await _result(rig, outcomes, upstream, rpc)
        result["figures"]["seconds"] = round(seconds, 1)
        result["parameters"] = {"requests": per_lane * clients, "clients": clients, "seed": seed}
        return result
    finally:
        for runner in runners:
            await runner.cleanup()
        await rig.close(keep=keep)


async def _result(rig: Rig, outcomes: list[Outcome], upstream: FaultyUpstream, rpc: FaultyRpc) -> dict[str, Any]:
    books = audit.books(rig)
    claims, claim_figures = await audit.claims(rig)
    told: Counter[str] = Counter()
    for o in outcomes:
        told[o.channel_id] += o.cost or 0
    charged = {r["channel_id"]: r["charged"] for r in rig.query("SELECT channel_id, charged FROM channels")}
    log = rig.log_text()
    invariants = {
        **books,
        "channels_told_costs_not_charged": sum(1 for c in set(told) | set(charged) if told[c] != charged.get(c, 0)),
        "accepted_without_cost_told": sum(1 for o in outcomes if o.accepted and o.cost is None),
        "answers_500": sum(1 for o in outcomes if o.status == 500),
        "log_tracebacks": log.count("Traceback"),
        "vouchers_lost": audit.vouchers_lost(rig, outcomes),
        **claims,
    }
    statuses = Counter(str(o.status) for o in outcomes)
    usage = Counter(r["status"] for r in rig.query("SELECT status FROM usage"))
    figures = {
        "requests": len(outcomes),
        "answers_by_status": dict(sorted(statuses.items())),
        "usage_rows_by_status": dict(sorted(usage.items())),
        "charged_total": sum(charged.values()),
        "upstream_faults": dict(sorted(upstream.injected.items())),
        "rpc_faults": dict(sorted(rpc.injected.items())),
        "log_errors": sum(1 for line in log.splitlines() if "level=ERROR" in line),
        **claim_figures,
    }
    return report.summary("faults", {}, invariants, figures)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m tests.reliability.faults", description="Upstream and RPC faults.")
    parser.add_argument("--requests", type=int, default=2000, help="paid requests in all (default 2000)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients, one channel each (default 8)")
    report.main(parser, lambda a: run(a.requests, clients=a.clients, seed=a.seed, env=a.env, keep=a.keep))
