"""The processes of one reliability run, on loopback: anvil with our contracts, the demo upstream,
and drain-provider as a subprocess (`python -m drain_provider`, its log in a file, its ledger on
disk), plus funded channels to it. The provider can be killed with SIGKILL and started again on
the same port and ledger, or pointed at another upstream or RPC (the fault-injecting ones).

Built on bench/harness.py (processes, ports, channels); the ledger is read here on short-lived
connections of its own (sqlite3, or asyncpg when DATABASE_URL is set), the way an auditor would,
never through the server.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from eth_account import Account

from bench.harness import ANVIL, DEMO_PRICES, REPO, Server, free_port, open_channels, start, wait_for_port
from drain_provider.consumer import DrainConsumer
from drain_provider.devtools.devchain import DevChain, attach_dev_node
from drain_provider.ledger.postgres import dollar_params


@dataclass
class Rig:
    anvil: Server
    demo: Server  # the demo upstream
    chain: DevChain
    workdir: Path
    provider_key: bytes
    port: int
    env: dict[str, str]
    consumers: list[DrainConsumer] = field(default_factory=list)
    provider: Server | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def provider_address(self) -> str:
        return str(Account.from_key(self.provider_key).address)

    @property
    def ledger_path(self) -> Path:
        return Path(self.env["DATABASE_PATH"])

    @property
    def log_path(self) -> Path:
        return self.workdir / "provider.log"

    # --- the provider process ------------------------------------------------------------------

    async def start_provider(self, **env: str) -> None:
        """Start drain-provider (settings in `env` replace the rig's) and wait until it listens:
        aiohttp opens its port only after every start-up context ran (abandoned reservations
        released, the ledger bound), so from then on the ledger shows the started state."""
        assert self.provider is None or self.provider.proc.poll() is not None, "the provider is running"
        self.env.update(env)
        self.provider = Server("drain-provider", self._spawn(), self.port)
        await asyncio.to_thread(wait_for_port, self.port, self.provider.proc, 60)

    def _spawn(self) -> subprocess.Popen[bytes]:
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"--- reliability rig: start {self.starts}\n".encode())
        return spawn([sys.executable, "-m", "drain_provider"], self.log_path, self.env)

    async def start_at_rest(self, timeout: float = 30.0) -> None:
        """Start the provider so that it only finishes what earlier runs left: its claim cycles
        reconcile pending claims, and its threshold is out of reach, so that no claim begins.
        Returns once no claim is pending (or after `timeout`: the audit then shows it), so that
        the chain and the ledger are compared at rest."""
        await self.start_provider(CLAIM_THRESHOLD=str(10**15), CLAIM_INTERVAL="0.5")
        deadline = time.monotonic() + timeout
        while self.query("SELECT COUNT(*) FROM claims WHERE status = 'pending'")[0][0]:
            if time.monotonic() > deadline:
                return
            await asyncio.sleep(0.1)

    def kill_provider(self) -> None:
        """SIGKILL: no shutdown code runs, exactly like a crash or the OOM killer."""
        assert self.provider is not None
        self.provider.proc.send_signal(signal.SIGKILL)
        self.provider.proc.wait()

    def stop_provider(self) -> None:
        if self.provider is not None and self.provider.proc.poll() is None:
            self.provider.stop()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # --- reading the ledger ----------------------------------------------------------------------

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        """Rows of the ledger (read by column name or position), on a connection of our own,
        opened and closed here; SQL with `?` placeholders, in the dialect both engines speak."""
        url = self.env.get("DATABASE_URL")
        if url:
            return postgres_query(url, sql, params)
        conn = sqlite3.connect(self.ledger_path, timeout=10)
        try:
            conn.row_factory = sqlite3.Row
            return list(conn.execute(sql, params))
        finally:
            conn.close()

    async def close(self, *, keep: bool = False) -> None:
        self.stop_provider()
        for server in (self.demo, self.anvil):
            server.stop()
        await self.chain.close()
        if not keep:
            shutil.rmtree(self.workdir, ignore_errors=True)


def postgres_query(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
    """`Rig.query` on PostgreSQL: asyncpg on an event loop of its own, in a thread (the caller
    may be inside a running loop, as sqlite3's blocking read is)."""

    async def fetch() -> list[Any]:
        conn = await asyncpg.connect(url)
        try:
            return list(await conn.fetch(dollar_params(sql), *params))
        finally:
            await conn.close()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, fetch()).result()


def spawn(args: list[str], log_path: Path, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    """A process of the repository (its cwd), its output appended to `log_path`."""
    with log_path.open("ab") as log:
        return subprocess.Popen(args, env=env, cwd=REPO, stdout=log, stderr=log)


async def build(channels: int, *, deposit: int = 100_000_000, env: dict[str, str] | None = None) -> Rig:
    """anvil, the demo upstream and `channels` funded channels; the provider is not started yet
    (`Rig.start_provider`). `env` sets provider settings."""
    owned: list[Server] = []
    try:
        workdir = Path(tempfile.mkdtemp(prefix="drain-reliability-"))
        anvil_port, demo_port = free_port(), free_port()
        owned.append(start("anvil", [str(ANVIL), "--port", str(anvil_port), "--silent"], anvil_port))
        demo_args = [sys.executable, "-m", "drain_provider.devtools.demo_upstream", "--port", str(demo_port)]
        demo = spawn(demo_args, workdir / "demo-upstream.log", os.environ)  # the streams faults cut short log there
        owned.append(Server("upstream", demo, demo_port))
        await asyncio.to_thread(wait_for_port, demo_port, demo)
        chain = await attach_dev_node(owned[0].url)
        provider_key = bytes(Account.create().key)
        (workdir / "pricing.json").write_text(json.dumps(DEMO_PRICES))
        port = free_port()
        settings = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("PRICE_", "OPENAI_", "ADMIN_"))},
            "PROVIDER_PRIVATE_KEY": "0x" + provider_key.hex(),
            "CHAIN_ID": str(chain.chain_id),
            "RPC_URL": owned[0].url,
            "DRAIN_CONTRACT": chain.contract,
            "UPSTREAM_BASE_URL": owned[1].url + "/v1",
            "PRICING_FILE": str(workdir / "pricing.json"),
            "DATABASE_PATH": str(workdir / "ledger.db"),
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "LOG_LEVEL": "WARNING",
            "CLAIM_INTERVAL": "0",
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
            **(env or {}),
        }
        rig = Rig(owned[0], owned[1], chain, workdir, provider_key, port, settings)
        await chain.fund(rig.provider_address)  # gas for its claims
        rig.consumers = await open_channels(chain, rig.provider_address, channels, deposit=deposit)
        return rig
    except BaseException:
        for server in owned:
            server.stop()
        raise
