"""CPU per paid request, or per ledger transaction pair, inside one process.

    python -m bench.inprocess json 1000     # process CPU per paid JSON request (µs)
    python -m bench.inprocess stream 800    # the same, streamed
    python -m bench.inprocess ledger 6400   # authorize + settle pairs, 32 channels, ledger alone

The provider app, the demo upstream and the client share one process and one event loop, so
the figure includes the client's and the upstream's CPU too; what it is for is comparing two
versions of the provider on the same machine minutes apart, where the full bench's load
generators add more noise than a refactor's effect. To compare with an older commit: `git
worktree add /tmp/old <commit>`, copy this file into its bench/, and run the two alternately
(each from its own directory: the current directory's package is the one imported).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp.test_utils import TestServer
from eth_account import Account

from drain_provider.api import create_app
from drain_provider.consumer import DrainConsumer
from drain_provider.devtools.demo_upstream import DEMO_MODEL, create_demo_upstream
from drain_provider.devtools.dev import dev_settings
from drain_provider.devtools.devchain import DevChain, start_embedded_chain
from drain_provider.ledger import Reservation, SQLiteLedger
from drain_provider.pricing import ModelPrice, ReservationPlan
from drain_provider.protocol import ChannelState, Voucher
from drain_provider.states import UsageSource, UsageStatus

WARM_UP = 50
PRICE = ModelPrice(1000, 2000)


@dataclass
class InProcess:
    """The embedded chain, the demo upstream and the provider, in this process, with a consumer
    whose channel holds a million USDC."""

    chain: DevChain
    upstream: TestServer
    provider: TestServer
    consumer: DrainConsumer

    @property
    def url(self) -> str:
        return str(self.provider.make_url("/v1/chat/completions"))

    async def close(self) -> None:
        await self.provider.close()
        await self.upstream.close()
        await self.chain.close()


async def start_in_process(**env: str) -> InProcess:
    """Everything started; `env` adds to the dev settings (no claims, a ledger of its own)."""
    chain = await start_embedded_chain()
    upstream = TestServer(create_demo_upstream())
    await upstream.start_server()
    env = {"DATABASE_PATH": str(Path(tempfile.mkdtemp()) / "ledger.db"), "CLAIM_INTERVAL": "0", **env}
    settings = dev_settings(env, chain, bytes(Account.create().key), str(upstream.make_url("/v1")))
    provider = TestServer(create_app(settings, chain=chain.client()))
    await provider.start_server()
    consumer_key = bytes(Account.create().key)
    await chain.fund(Account.from_key(consumer_key).address, usdc=10**12)
    consumer = await DrainConsumer.open_channel(
        chain.w3, chain.contract, consumer_key, settings.provider_address, deposit=10**12, duration=30 * 86_400
    )
    return InProcess(chain, upstream, provider, consumer)


async def paid_requests(count: int, *, stream: bool) -> dict[str, float]:
    # No chain polls while measuring: the embedded chain runs in this process, and its py-evm
    # calls (the watcher's gas reads every poll) would be counted as the provider's CPU.
    run = await start_in_process(CHAIN_POLL_INTERVAL="3600")
    consumer, url = run.consumer, run.url
    body = {
        "model": DEMO_MODEL,
        "messages": [{"role": "user", "content": "Hello there, how are you?"}],
        "max_tokens": 60,
    }
    body["stream"] = stream
    headers = [consumer.sign(1000 * (i + 1)).header_value() for i in range(count + WARM_UP)]
    async with aiohttp.ClientSession() as session:
        for i, header in enumerate(headers):
            if i == WARM_UP:
                cpu, wall = time.process_time(), time.perf_counter()
            async with session.post(url, json=body, headers={"X-DRAIN-Voucher": header}) as response:
                assert response.status == 200, await response.text()
                await response.read()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    await run.close()
    return {"cpu_us_per_request": cpu / count * 1e6, "wall_us_per_request": wall / count * 1e6}


async def ledger_pairs(count: int) -> dict[str, float]:
    plan = ReservationPlan(PRICE, input_tokens=100, wanted_output_tokens=400, min_output_tokens=16)
    ledger = SQLiteLedger(Path(tempfile.mkdtemp()) / "ledger.db")
    await ledger.open()
    channels = [f"0x{i + 1:064x}" for i in range(32)]
    for channel in channels:
        await ledger.add_channel(
            channel, ChannelState("0x" + "11" * 20, "0x" + "22" * 20, 10**12, 0, 2**40), contract="0x" + "33" * 20
        )

    async def lane(channel: str) -> None:
        for i in range(count // len(channels)):
            voucher = Voucher(channel, 2000 * (i + 1), i + 1, bytes(65))
            reservation = await ledger.authorize(voucher, plan, endpoint="/chat/completions", model="demo")
            assert isinstance(reservation, Reservation)
            await ledger.settle(
                reservation,
                price_cost=900,
                input_tokens=100,
                output_tokens=400,
                status=UsageStatus.OK,
                usage_source=UsageSource.UPSTREAM,
            )

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(lane(channel) for channel in channels))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    await ledger.close()
    return {"cpu_us_per_pair": cpu / count * 1e6, "pairs_per_s": count / wall}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.inprocess", description=__doc__)
    parser.add_argument("what", choices=["json", "stream", "ledger"])
    parser.add_argument("count", type=int)
    args = parser.parse_args()
    logging.disable(logging.CRITICAL)
    if args.what == "ledger":
        figures = asyncio.run(ledger_pairs(args.count))
    else:
        figures = asyncio.run(paid_requests(args.count, stream=args.what == "stream"))
    print(json.dumps({key: round(value, 1) for key, value in figures.items()}))
