"""Everything a benchmark run stands on, on loopback: anvil with the contracts, the demo upstream,
the pass-through proxy and drain-provider, each in its own process, plus funded channels.

Server CPU is read from /proc/<pid>/stat (user + system time of the whole process, all its
threads): it counts what the server spent, whatever else the machine is doing.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from eth_account import Account

from drain_provider.consumer import DrainConsumer
from drain_provider.devtools.devchain import DevChain, attach_dev_node

REPO = Path(__file__).resolve().parent.parent
ANVIL = REPO / "node_modules" / ".bin" / "anvil"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
DEMO_PRICES = {"demo": {"input": 1000, "output": 2000}}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{proc.args!r} did not start listening on {port}") from None
            time.sleep(0.05)


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start(name: str, args: list[str], port: int, env: dict[str, str] | None = None) -> Server:
    proc = subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=sys.stderr)
    wait_for_port(port, proc)
    return Server(name, proc, port)


@dataclass
class Rig:
    """The processes of one run and the channels opened for it."""

    anvil: Server
    upstream: Server
    passthrough: Server
    provider: Server
    chain: DevChain
    workdir: Path
    provider_env: dict[str, str] = field(default_factory=dict)
    consumers: list[DrainConsumer] = field(default_factory=list)

    def restart_provider(self, **env: str) -> None:
        """A new provider process on the same port, with some settings changed (a ledger file)."""
        self.provider.stop()
        self.provider_env.update(env)
        args = [sys.executable, "-m", "drain_provider"]
        self.provider = start("drain-provider", args, self.provider.port, self.provider_env)

    def stop(self) -> None:
        for server in (self.provider, self.passthrough, self.upstream, self.anvil):
            server.stop()


async def build_rig(channels: int, *, ledger: Path | None = None, provider_env: dict[str, str] | None = None) -> Rig:
    servers: list[Server] = []
    try:
        return await _build_rig(servers, channels, ledger, provider_env or {})
    except BaseException:
        for server in servers:
            server.stop()
        raise


async def _build_rig(servers: list[Server], channels: int, ledger: Path | None, provider_env: dict[str, str]) -> Rig:
    anvil_port, upstream_port, proxy_port, provider_port = (free_port() for _ in range(4))
    servers.append(start("anvil", [str(ANVIL), "--port", str(anvil_port), "--silent"], anvil_port))
    servers.append(
        start("upstream", [sys.executable, "-m", "drain_provider.devtools.demo_upstream", "--port", str(upstream_port)],
              upstream_port)
    )  # fmt: skip
    anvil, upstream = servers
    servers.append(
        start(
            "passthrough",
            [sys.executable, "bench/passthrough.py", "--port", str(proxy_port), "--upstream", upstream.url],
            proxy_port,
        )
    )
    chain = await attach_dev_node(anvil.url)
    provider_key = bytes(Account.create().key)
    workdir = Path(tempfile.mkdtemp(prefix="drain-bench-"))
    pricing = workdir / "pricing.json"
    pricing.write_text(json.dumps(DEMO_PRICES))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PRICE_", "OPENAI_", "ADMIN_"))},
        "PROVIDER_PRIVATE_KEY": "0x" + provider_key.hex(),
        "CHAIN_ID": str(chain.chain_id),
        "RPC_URL": anvil.url,
        "DRAIN_CONTRACT": chain.contract,
        "UPSTREAM_BASE_URL": upstream.url + "/v1",
        "PRICING_FILE": str(pricing),
        "DATABASE_PATH": str(ledger or workdir / "bench.db"),
        "HOST": "127.0.0.1",
        "PORT": str(provider_port),
        "LOG_LEVEL": "WARNING",
        "CLAIM_INTERVAL": "0",
        "MAX_CONNECTIONS": "4096",  # 1,000 streams at once, and the load generators' other connections
        **provider_env,
    }
    servers.append(start("drain-provider", [sys.executable, "-m", "drain_provider"], provider_port, env))
    rig = Rig(anvil, upstream, servers[2], servers[3], chain, workdir=workdir, provider_env=env)
    rig.consumers = await open_channels(chain, Account.from_key(provider_key).address, channels)
    return rig


async def open_channels(
    chain: DevChain, provider: str, count: int, *, deposit: int = 100_000_000
) -> list[DrainConsumer]:
    keys = [bytes(Account.create().key) for _ in range(count)]
    for key in keys:  # the funder's transactions, one after another
        await chain.fund(Account.from_key(key).address, usdc=deposit)

    async def open_one(key: bytes) -> DrainConsumer:
        return await DrainConsumer.open_channel(
            chain.w3, chain.contract, key, provider, deposit=deposit, duration=86_400, token=chain.token
        )

    consumers: list[DrainConsumer] = []
    for start_at in range(0, count, 32):  # each consumer's own transactions, 32 at a time
        consumers += await asyncio.gather(*(open_one(key) for key in keys[start_at : start_at + 32]))
    return consumers
