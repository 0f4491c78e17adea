"""Paid latency while other clients post large bodies that pay nothing.

    python -m bench.unpaid                  # 4 clients posting 1 MiB bodies without a voucher
    python -m bench.unpaid --clients 8 --paid 300

The provider, the demo upstream and one paid client (sequential requests, one fresh voucher
each) share one process, as in bench/inprocess.py; the unpaid clients run in a second process
(`python -m bench.unpaid attack URL`), so that their own CPU is not the provider's. The paid
client's latency is measured twice: alone, then while the unpaid clients post. What is compared
is the server's order of work: what an unpaid request costs before it is refused. The per-IP
limit on failed payments is turned off (PAYMENT_FAILURES_PER_MINUTE=0), so that the figure is
what each refused request costs, not how few get through; `--limit N` turns it on.

To compare with an older commit, as for bench/inprocess.py: `git worktree add /tmp/old <commit>`,
copy this file into its bench/, and run each from its own directory.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import random
import subprocess
import sys
import time

import aiohttp

from drain_provider.devtools.demo_upstream import DEMO_MODEL

from .harness import percentile
from .inprocess import start_in_process

UNPAID_ADDRESS = "127.0.0.2"
WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "wizards", "hex")


def unpaid_body(size: int) -> bytes:
    """A chat request of about `size` bytes of ordinary words (no voucher goes with it)."""
    rng = random.Random(7)
    text = " ".join(rng.choice(WORDS) for _ in range(size // 5))[: size - 100]
    return json.dumps({"model": DEMO_MODEL, "messages": [{"role": "user", "content": text}]}).encode()


async def attack(url: str, clients: int, size: int) -> None:
    """Post unpaid bodies from `clients` connections until stdin closes; then print how many
    requests got which status (and how many failed at the connection)."""
    body = unpaid_body(size)
    outcomes: collections.Counter[str] = collections.Counter()
    stop = asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

    async def client(session: aiohttp.ClientSession) -> None:
        while not stop.done():
            try:
                headers = {"Content-Type": "application/json"}
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    outcomes[str(response.status)] += 1
            except aiohttp.ClientError as exc:
                outcomes[type(exc).__name__] += 1

    # From another loopback address than the paid client's: to the limit, another client.
    connector = aiohttp.TCPConnector(local_addr=(UNPAID_ADDRESS, 0))
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    print(json.dumps(dict(sorted(outcomes.items()))))


async def measure(clients: int, paid: int, size: int, limit: int) -> dict[str, object]:
    run = await start_in_process(PAYMENT_FAILURES_PER_MINUTE=str(limit))
    consumer, url = run.consumer, run.url
    messages = [{"role": "user", "content": "Hello there, how are you?"}]
    body = {"model": DEMO_MODEL, "messages": messages, "max_tokens": 60}
    amount = 0

    async def paid_latencies(session: aiohttp.ClientSession, count: int) -> list[float]:
        nonlocal amount
        latencies = []
        for _ in range(count):
            amount += 1000
            headers = {"X-DRAIN-Voucher": consumer.sign(amount).header_value()}
            started = time.perf_counter()
            async with session.post(url, json=body, headers=headers) as response:
                assert response.status == 200, await response.text()
                await response.read()
            latencies.append((time.perf_counter() - started) * 1000)
        return latencies

    async with aiohttp.ClientSession() as session:
        await paid_latencies(session, 50)  # warm up
        alone = await paid_latencies(session, paid)
        attackers = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "bench.unpaid", "attack", url, "--clients", str(clients), "--size", str(size)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        await asyncio.sleep(2.0)  # let the unpaid clients get going
        started = time.perf_counter()
        loaded = await paid_latencies(session, paid)
        loaded_seconds = time.perf_counter() - started
        out, _ = await attackers.communicate(b"")  # stdin closed: they stop and report
    unpaid = json.loads(out)
    await run.close()
    return {
        "unpaid_clients": clients,
        "unpaid_body_bytes": len(unpaid_body(size)),
        "alone_p50_ms": round(percentile(alone, 0.5), 2),
        "alone_p95_ms": round(percentile(alone, 0.95), 2),
        "loaded_p50_ms": round(percentile(loaded, 0.5), 2),
        "loaded_p95_ms": round(percentile(loaded, 0.95), 2),
        "unpaid_answers": unpaid,  # over the loaded phase and the 2 s before it
        "unpaid_per_s": round(sum(unpaid.values()) / (loaded_seconds + 2.0), 1),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.unpaid", description=__doc__)
    parser.add_argument("mode", nargs="?", default="measure", choices=["measure", "attack"])
    parser.add_argument("url", nargs="?")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--paid", type=int, default=200)
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--limit", type=int, default=0, help="PAYMENT_FAILURES_PER_MINUTE (0: off)")
    args = parser.parse_args()
    logging.disable(logging.CRITICAL)
    if args.mode == "attack":
        asyncio.run(attack(args.url, args.clients, args.size))
    else:
        print(json.dumps(asyncio.run(measure(args.clients, args.paid, args.size, args.limit))))
