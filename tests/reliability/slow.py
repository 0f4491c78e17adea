"""Slow and flooding clients: the latency of paid requests with nobody else around, then under a
slowloris (hundreds of connections trickling header bytes, or a body, a few bytes at a time),
then under a flood of unpaid 1 MiB bodies from 4 clients. A performance figure, like the bench:
the ratios are reported, not judged (the target is p50 within 3x of quiet); what is judged is
that every paid request still succeeded.

    python -m tests.reliability.slow --seconds 10 --connections 300

The attackers run in a process of their own (`--attack`), so that the paid client's event loop
measures the server, not its neighbours.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import subprocess
import sys
import time
from typing import Any

import aiohttp

from bench.harness import REPO, percentile

from . import report
from .paying import chat_body, send, step_voucher
from .rig import Rig, build

FLOOD_CLIENTS = 4
FLOOD_BODY_BYTES = 1024 * 1024 - 1024  # just under MAX_BODY_BYTES' default: read and parsed whole today
TRICKLE_EVERY = 0.5  # seconds between a slow connection's writes


# --- the attackers (their own process) ------------------------------------------------------------


async def slowloris(port: int, connections: int, seconds: float, stats: dict[str, int]) -> None:
    """`connections` connections, each sending its request a few bytes at a time, and opening
    again when the server closes it: half trickle their headers, half a declared 100 kB body
    (with no voucher: a 402 at once). Each connection is its own address (X-Forwarded-For, as
    the flood's clients): their refusals do not count against the paying client's."""
    stats.update(connections_opened=0, closed_by_server=0)
    deadline = time.monotonic() + seconds

    async def one(i: int) -> None:
        body_first = i % 2 == 1
        while time.monotonic() < deadline:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.1)
                continue
            stats["connections_opened"] += 1
            head = (
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"X-Forwarded-For: 203.0.113.%d\r\n" % (i % 250 + 1)
            )
            if body_first:
                writer.write(head + b"Content-Length: 100000\r\n\r\n")
            try:
                piece = 0
                while time.monotonic() < deadline and not reader.at_eof():
                    writer.write(b'{"a":' if body_first else head[piece : piece + 1] or b"X-A: b\r\n")
                    await writer.drain()
                    piece += 1
                    await asyncio.sleep(TRICKLE_EVERY)
                stats["closed_by_server"] += reader.at_eof()
            except OSError:
                stats["closed_by_server"] += 1
            finally:
                writer.close()

    await asyncio.gather(*(one(i) for i in range(connections)))


def flood_body(seed: int = 1) -> bytes:
    rng = random.Random(seed)
    words = [rng.choice(["lorem", "ipsum", "dolor", "sit", "amet", "token", "payment", "channel"]) for _ in range(40)]
    text = " ".join(words)
    prefix, suffix = b'{"model":"demo","messages":[{"role":"user","content":"', b'"}]}'
    room = FLOOD_BODY_BYTES - len(prefix) - len(suffix)
    return prefix + (text * (room // len(text) + 1))[:room].encode() + suffix


async def flood(port: int, clients: int, seconds: float, stats: dict[str, int]) -> None:
    """`clients` clients POSTing ~1 MiB chat bodies with no voucher, one after another; `stats`
    counts their answers by status. Each is its own address, as a reverse proxy on loopback (a
    trusted proxy by default) names it in X-Forwarded-For: the paid client, loopback itself, is
    another, and is not limited for their refusals."""
    body = flood_body()
    deadline = time.monotonic() + seconds

    async def one(session: aiohttp.ClientSession, address: str) -> None:
        while time.monotonic() < deadline:
            try:
                async with session.post(
                    f"http://127.0.0.1:{port}/v1/chat/completions", data=body, headers={"X-Forwarded-For": address}
                ) as resp:
                    await resp.read()
                    stats[str(resp.status)] = stats.get(str(resp.status), 0) + 1
            except (aiohttp.ClientError, OSError):
                stats["no_answer"] = stats.get("no_answer", 0) + 1
                await asyncio.sleep(0.05)

    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(one(session, f"198.51.100.{i + 1}") for i in range(clients)))


def attack(kind: str, port: int, connections: int, seconds: float) -> None:
    """The attacker process: prints "ready" once its loop runs, attacks until `seconds` pass or
    SIGTERM, then prints its stats as JSON."""
    stats: dict[str, int] = {}
    if kind == "slowloris":
        work = slowloris(port, connections, seconds, stats)
    else:
        work = flood(port, FLOOD_CLIENTS, seconds, stats)
    loop = asyncio.new_event_loop()
    task = loop.create_task(work)
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    loop.call_soon(lambda: print("ready", flush=True))
    with contextlib.suppress(asyncio.CancelledError):
        loop.run_until_complete(task)
    loop.close()
    print(json.dumps(stats), flush=True)


# --- the measurement ---------------------------------------------------------------------------------


async def paid_latencies(rig: Rig, session: aiohttp.ClientSession, seconds: float) -> tuple[list[float], int]:
    """Paid JSON requests one after another for `seconds`: their latencies, and how many failed."""
    consumer = rig.consumers[0]
    latencies, failures = [], 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        body = chat_body("How slow is it now?", stream=False, max_tokens=16)
        outcome = await send(session, rig.url, step_voucher(consumer, 1_000), body, timeout=30)
        if outcome.status == 200:
            latencies.append(outcome.latency * 1000)
        else:
            failures += 1
    return latencies, failures


async def phase(
    rig: Rig, session: aiohttp.ClientSession, kind: str | None, seconds: float, connections: int
) -> dict[str, Any]:
    attacker = None
    if kind is not None:
        args = [sys.executable, "-m", "tests.reliability.slow", "--attack", kind, "--port", str(rig.port),
                "--connections", str(connections), "--seconds", str(seconds + 30)]  # fmt: skip
        attacker = await asyncio.create_subprocess_exec(*args, cwd=REPO, stdout=subprocess.PIPE, env=rig.env)
        assert attacker.stdout is not None
        await attacker.stdout.readline()  # "ready"
        await asyncio.sleep(min(seconds, 1.0))  # the connections open, the first floods arrive
    try:
        latencies, failures = await paid_latencies(rig, session, seconds)
    finally:
        attack_stats: dict[str, Any] = {}
        if attacker is not None:
            with contextlib.suppress(ProcessLookupError):  # it ended on its own (it should not)
                attacker.terminate()
            out, _ = await attacker.communicate()
            attack_stats = json.loads(out.strip() or b"{}")
    return {
        "paid_requests": len(latencies),
        "paid_failures": failures,
        "p50_ms": round(percentile(latencies, 0.5), 2) if latencies else None,
        "p99_ms": round(percentile(latencies, 0.99), 2) if latencies else None,
        "attacker": attack_stats,
    }


async def run(
    seconds: float, *, connections: int = 300, env: dict[str, str] | None = None, keep: bool = False
) -> dict[str, Any]:
    rig = await build(1, env=env)
    try:
        await rig.start_provider()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            await paid_latencies(rig, session, 0.5)  # warm-up: the channel is read from chain once
            phases = {
                "quiet": await phase(rig, session, None, seconds, connections),
                "slowloris": await phase(rig, session, "slowloris", seconds, connections),
                "flood": await phase(rig, session, "flood", seconds, connections),
            }
        rig.kill_provider()  # nothing of the ledger is judged here: no need to wait for a graceful stop
    finally:
        await rig.close(keep=keep)
    quiet = phases["quiet"]["p50_ms"]
    figures: dict[str, Any] = dict(phases)
    for name in ("slowloris", "flood"):
        p50 = phases[name]["p50_ms"]
        figures[f"{name}_p50_over_quiet"] = round(p50 / quiet, 2) if p50 and quiet else None
    figures["target"] = "p50 within 3x of quiet"
    invariants = {f"paid_failures_{name}": phases[name]["paid_failures"] for name in phases}
    invariants["phases_without_a_paid_answer"] = sum(1 for p in phases.values() if not p["paid_requests"])
    parameters = {"seconds": seconds, "connections": connections, "flood_clients": FLOOD_CLIENTS}
    return report.summary("slow", parameters, invariants, figures)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m tests.reliability.slow", description="Slow and flooding clients.")
    parser.add_argument("--seconds", type=float, default=10, help="each phase's measuring time (default 10)")
    parser.add_argument("--connections", type=int, default=300, help="slowloris connections (default 300)")
    parser.add_argument("--attack", choices=("slowloris", "flood"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    if "--attack" in sys.argv:
        args, _ = parser.parse_known_args()
        attack(args.attack, args.port, args.connections, args.seconds)
    else:
        report.main(parser, lambda a: run(a.seconds, connections=a.connections, env=a.env, keep=a.keep))
