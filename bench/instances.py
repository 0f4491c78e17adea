"""Several instances on one PostgreSQL ledger: paid requests per second and CPU per paid request
with 1, 2 and 3 provider processes sharing one database, and the SQLite single process beside
them, under the same load in the same run.

    python -m bench.instances [--quick] [--output FILE]

The load is bench/loadgen.py's (separate processes, pre-signed vouchers, one channel per lane);
the lanes are spread over the instances as a load balancer with sticky sessions would spread
clients (each channel's requests go to one instance, so that its nonces arrive in order). CPU
is counted for the provider processes and, apart, for the PostgreSQL server (its postmaster and
every backend, those that exited included).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .harness import CLOCK_TICKS, Rig, Server, build_rig, free_port, start
from .overhead import BODY, VOUCHER_BUDGET
from .postgres_server import PostgresServer, running_server

CONCURRENCY = 64


def postgres_cpu_seconds(server: PostgresServer) -> float:
    """The CPU of the whole PostgreSQL server: its postmaster, its live backends, and (through the
    postmaster's cutime/cstime) the backends that have exited."""
    pid_file = server.data / "postmaster.pid" if server.data else None
    if pid_file is None or not pid_file.exists():
        return 0.0
    postmaster = int(pid_file.read_text().split()[0])
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, parent = int(stat.parent.name), int(fields[1])
        if pid == postmaster:
            total += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
        elif parent == postmaster:
            total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


async def load_many(rig: Rig, servers: list[Server], *, per_lane: int) -> dict[str, float]:
    """CONCURRENCY lanes spread over `servers` (lane i on server i mod n), one loadgen process per
    server; requests/s, and provider CPU per request (µs)."""
    consumers = rig.consumers[:CONCURRENCY]
    lanes = [[c.sign(c.amount + VOUCHER_BUDGET).header_value() for _ in range(per_lane)] for c in consumers]
    workdir = Path(tempfile.mkdtemp(prefix="instances-", dir=rig.workdir))
    jobs = []
    for n, server in enumerate(servers):
        job = {
            "url": server.url + "/v1/chat/completions",
            "body": BODY,
            "lanes": lanes[n :: len(servers)],
            "requests_per_lane": per_lane,
            "stream": False,
        }
        (workdir / f"job{n}.json").write_text(json.dumps(job))
        jobs.append((workdir / f"job{n}.json", workdir / f"out{n}.json"))
    cpu_before = sum(s.cpu_seconds() for s in servers)
    started = time.perf_counter()
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, str(Path(__file__).with_name("loadgen.py")), str(j), str(o)
        )
        for j, o in jobs
    ]
    for proc in procs:
        if await proc.wait() != 0:
            raise RuntimeError("a load generator failed")
    wall = time.perf_counter() - started
    cpu = sum(s.cpu_seconds() for s in servers) - cpu_before
    requests = len(consumers) * per_lane
    return {
        "requests": requests,
        "requests_per_s": requests / wall,
        "provider_cpu_us_per_request": cpu / requests * 1e6,
    }


def start_instances(rig: Rig, count: int, database_url: str) -> list[Server]:
    env = {**rig.provider_env, "DATABASE_URL": database_url}
    servers = []
    for _ in range(count):
        port = free_port()
        servers.append(
            start("drain-provider", [sys.executable, "-m", "drain_provider"], port, {**env, "PORT": str(port)})
        )
    return servers


async def measure(
    rig: Rig, servers: list[Server], postgres: PostgresServer | None, per_lane: int, rounds: int
) -> dict[str, Any]:
    await load_many(rig, servers, per_lane=2)  # warm-up: connections, channels known, tokenizer
    runs = []
    for _ in range(rounds):
        pg_before = postgres_cpu_seconds(postgres) if postgres else 0.0
        figures = await load_many(rig, servers, per_lane=per_lane)
        if postgres:
            figures["postgres_cpu_us_per_request"] = (
                (postgres_cpu_seconds(postgres) - pg_before) / figures["requests"] * 1e6
            )
        runs.append(figures)
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


async def run(*, quick: bool) -> dict[str, Any]:
    per_lane, rounds = (10, 1) if quick else (30, 3)
    rig = await build_rig(CONCURRENCY)
    results: dict[str, Any] = {"concurrency": CONCURRENCY, "requests_per_lane": per_lane, "rounds": rounds}
    try:
        results["sqlite"] = await measure(rig, [rig.provider], None, per_lane, rounds)
        rig.provider.stop()
        with running_server(durable=True) as postgres:
            for count in (1, 2, 3):
                servers = start_instances(rig, count, await postgres.create_database())
                try:
                    results[f"postgresql_{count}"] = await measure(rig, servers, postgres, per_lane, rounds)
                finally:
                    for server in servers:
                        server.stop()
    finally:
        for server in (rig.passthrough, rig.upstream, rig.anvil):
            server.stop()
    return results


def table(results: dict[str, Any]) -> str:
    base = results["sqlite"]
    out = [
        "| ledger | instances | paid req/s | vs SQLite | provider CPU µs/req | PostgreSQL CPU µs/req |",
        "|---|---|---|---|---|---|",
        f"| SQLite | 1 | {base['requests_per_s']:.0f} | 1.00 | {base['provider_cpu_us_per_request']:.0f} | - |",
    ]
    for count in (1, 2, 3):
        f = results[f"postgresql_{count}"]
        out.append(
            f"| PostgreSQL | {count} | {f['requests_per_s']:.0f} | {f['requests_per_s'] / base['requests_per_s']:.2f} "
            f"| {f['provider_cpu_us_per_request']:.0f} | {f['postgres_cpu_us_per_request']:.0f} |"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.instances", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short round per setup")
    parser.add_argument("--output", type=Path, help="write the figures as JSON here too")
    args = parser.parse_args()
    results = asyncio.run(run(quick=args.quick))
    print(table(results))
    if args.output:
        args.output.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
