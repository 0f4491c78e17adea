"""Non-streaming figures at fixed concurrency (1, 32, 256): latency added over calling the
upstream directly (p50/p99), requests per second, and server CPU per request, for the
pass-through proxy and for drain-provider. The load comes from separate processes
(bench/loadgen.py) with pre-signed vouchers, one channel per concurrent client."""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from .harness import Rig, Server, percentile

BODY = {"model": "demo", "messages": [{"role": "user", "content": "Hello, how are you today?"}], "max_tokens": 20}
VOUCHER_BUDGET = 1_000  # base units per request; a request here costs about 55


async def load(
    rig: Rig, server: Server, *, concurrency: int, per_lane: int, paid: bool, body: dict[str, Any] = BODY,
    stream: bool = False, processes: int = 2, stagger: float = 0.0, budget: int = VOUCHER_BUDGET,
    during: Any = None,
) -> dict[str, Any]:  # fmt: skip
    """Run one load of `concurrency` lanes (lane i pays on channel i mod the channels, its
    vouchers signed in lane order); latencies (s), wall time, the server's CPU seconds, and what
    `during()` (polled every 0.2 s while the load runs) returned at most."""
    consumers = [rig.consumers[i % len(rig.consumers)] for i in range(concurrency)]
    lanes = [[c.sign(c.amount + budget).header_value() for _ in range(per_lane)] if paid else [] for c in consumers]
    processes = max(1, min(processes, concurrency))
    workdir = Path(tempfile.mkdtemp(prefix="loadgen-", dir=rig.workdir))
    jobs = []
    for p in range(processes):
        job = {
            "url": server.url + "/v1/chat/completions",
            "body": body,
            "lanes": lanes[p::processes],
            "requests_per_lane": per_lane,
            "stream": stream,
            "stagger": stagger * processes,
        }
        (workdir / f"job{p}.json").write_text(json.dumps(job))
        jobs.append((workdir / f"job{p}.json", workdir / f"out{p}.json"))
    cpu_before = server.cpu_seconds()
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, str(Path(__file__).with_name("loadgen.py")), str(j), str(o)
        )
        for j, o in jobs
    ]
    peak = 0.0
    while during is not None and any(p.returncode is None for p in procs):
        peak = max(peak, during())
        await asyncio.sleep(0.2)
    for proc in procs:
        if await proc.wait() != 0:
            raise RuntimeError(f"a load generator failed against {server.name}")
    cpu = server.cpu_seconds() - cpu_before
    outs = [json.loads(o.read_text()) for _, o in jobs]
    latencies = [x for out in outs for x in out["latencies"]]
    return {"latencies": latencies, "wall": max(out["wall"] for out in outs), "cpu": cpu, "peak": peak}


async def run(rig: Rig, *, quick: bool) -> dict[str, Any]:
    """Each concurrency level in rounds, the three paths one after another in every round, so that
    the machine's drift hits them alike; latencies pooled over the rounds, requests/s and CPU per
    request the median round's."""
    levels = {1: 100 if quick else 150, 32: 10 if quick else 15, 256: 2 if quick else 3}
    rounds = 1 if quick else 3
    paths = [(rig.upstream, False), (rig.passthrough, False), (rig.provider, True)]
    for server, paid in paths:  # warm-up: connections, channel caches, tokenizer
        await load(rig, server, concurrency=min(256, len(rig.consumers)), per_lane=1, paid=paid)
    results: dict[str, Any] = {}
    for concurrency, per_lane in levels.items():
        runs: dict[str, list[dict[str, Any]]] = {server.name: [] for server, _ in paths}
        for _ in range(rounds):
            for server, paid in paths:
                runs[server.name].append(await load(rig, server, concurrency=concurrency, per_lane=per_lane, paid=paid))
        level: dict[str, Any] = {}
        for name, done in runs.items():
            latencies = [x for run_ in done for x in run_["latencies"]]
            per_round = len(done[0]["latencies"])
            level[name] = {
                "requests": len(latencies),
                "rounds": len(done),
                "p50_ms": statistics.median(latencies) * 1000,
                "p99_ms": percentile(latencies, 0.99) * 1000,
                "requests_per_s": statistics.median(per_round / run_["wall"] for run_ in done),
                "server_cpu_us_per_request": statistics.median(run_["cpu"] / per_round * 1e6 for run_ in done),
            }
        for name in ("passthrough", "drain-provider"):
            level[name]["added_p50_ms"] = level[name]["p50_ms"] - level["upstream"]["p50_ms"]
            level[name]["added_p99_ms"] = level[name]["p99_ms"] - level["upstream"]["p99_ms"]
        level["cpu_ratio_provider_vs_passthrough"] = (
            level["drain-provider"]["server_cpu_us_per_request"] / level["passthrough"]["server_cpu_us_per_request"]
        )
        level["rps_ratio_provider_vs_passthrough"] = (
            level["drain-provider"]["requests_per_s"] / level["passthrough"]["requests_per_s"]
        )
        results[str(concurrency)] = level
    return results
