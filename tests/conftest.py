"""Real parts for every test: an embedded EVM with our contracts, the demo upstream served over
HTTP on a free port, the provider app served on another, and the official openai SDK."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from eth_account import Account
from openai import AsyncOpenAI

from drain_provider.api import RUNNER_OPTIONS, create_app
from drain_provider.api.state import CLAIMER, LEDGER
from drain_provider.chain import ChainClient
from drain_provider.claimer import Claimer
from drain_provider.config import Settings
from drain_provider.consumer import DrainConsumer
from drain_provider.devtools.demo_upstream import DEMO_MODEL, DEMO_STATS, DemoStats, create_demo_upstream
from drain_provider.devtools.devchain import DevChain, attach_dev_node, start_embedded_chain
from drain_provider.ledger import Ledger
from drain_provider.pricing import ModelPrice
from drain_provider.protocol import Domain

DEMO_PRICE = ModelPrice(input_per_1k=1000, output_per_1k=2000)
USDC = 1_000_000


@pytest.fixture
async def chain() -> AsyncIterator[DevChain]:
    dev_chain = await start_embedded_chain()
    yield dev_chain
    await dev_chain.close()


@dataclass
class Upstream:
    server: TestServer
    stats: DemoStats

    @property
    def url(self) -> str:
        return str(self.server.make_url("/v1"))


@pytest.fixture
async def upstream(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> Upstream:
    app = create_demo_upstream()
    server = await aiohttp_server(app)
    return Upstream(server, app[DEMO_STATS])


@dataclass
class Provider:
    settings: Settings
    server: TestServer
    app: web.Application
    clients: list[AsyncOpenAI] = field(default_factory=list)

    @property
    def url(self) -> str:
        return str(self.server.make_url("/v1"))

    @property
    def address(self) -> str:
        return self.settings.provider_address

    @property
    def domain(self) -> Domain:
        return Domain(self.settings.chain_id, self.settings.drain_contract)

    @property
    def ledger(self) -> Ledger:
        return self.app[LEDGER]

    @property
    def claimer(self) -> Claimer:
        return self.app[CLAIMER]

    def client(self) -> AsyncOpenAI:
        """An openai SDK client for this provider (closed when the test ends)."""
        client = AsyncOpenAI(base_url=self.url, api_key="unused", max_retries=0)
        self.clients.append(client)
        return client


ProviderFactory = Callable[..., Awaitable[Provider]]


def make_settings(chain: DevChain, upstream_url: str, database: Path, **overrides: Any) -> Settings:
    settings = Settings(
        provider_private_key=bytes(Account.create().key),
        chain_id=chain.chain_id,
        drain_contract=chain.contract,
        contract_version="v2",
        rpc_url=None,
        host="127.0.0.1",
        upstream_base_url=upstream_url,
        upstream_timeout=5.0,
        database_path=database,
        prices={DEMO_MODEL: DEMO_PRICE, "gpt-4o": ModelPrice(7500, 22500)},
        claim_interval=0,  # tests run claim cycles themselves
    )
    return replace(settings, **overrides)


@pytest.fixture
async def provider_factory(
    chain: DevChain, upstream: Upstream, aiohttp_server: Callable[..., Awaitable[TestServer]], tmp_path: Path
) -> AsyncIterator[ProviderFactory]:
    started: list[Provider] = []

    async def start(
        chain_client: ChainClient | None = None, on: DevChain | None = None, fund: bool = True, **overrides: Any
    ) -> Provider:
        """A provider app served on a free port, for the contracts of `on` (default: the embedded
        chain) read through `chain_client` (default: directly); `overrides` replace Settings fields."""
        dev_chain = on or chain
        settings = make_settings(dev_chain, upstream.url, tmp_path / f"ledger{len(started)}.db", **overrides)
        if fund:  # gas money for claims
            await dev_chain.fund(settings.provider_address)
        app = create_app(settings, chain=chain_client or dev_chain.client())
        # TestServer always cancels handlers on disconnect, as RUNNER_OPTIONS asks; a short
        # shutdown_timeout lets a test stop a server mid-request.
        assert RUNNER_OPTIONS["handler_cancellation"]
        server = await aiohttp_server(app, shutdown_timeout=0.5)
        started.append(Provider(settings, server, app))
        return started[-1]

    yield start
    for provider in started:
        for client in provider.clients:
            await client.close()


@pytest.fixture
async def provider(provider_factory: ProviderFactory) -> Provider:
    return await provider_factory()


ChannelFactory = Callable[..., Awaitable[DrainConsumer]]


@pytest.fixture
def open_channel(chain: DevChain) -> ChannelFactory:
    """Open a funded channel from a fresh consumer to `provider` (a Provider or an address)."""

    async def open_(
        provider: Provider | str, *, deposit: int = 10 * USDC, duration: int = 86_400, on: DevChain | None = None
    ) -> DrainConsumer:
        dev_chain = on or chain
        address = provider.address if isinstance(provider, Provider) else provider
        key = bytes(Account.create().key)
        await dev_chain.fund(Account.from_key(key).address, usdc=deposit)
        consumer = await DrainConsumer.open_channel(
            dev_chain.client(), dev_chain.token, key, address, deposit=deposit, duration=duration
        )
        if isinstance(provider, Provider):
            consumer.api = provider.url
        return consumer

    return open_


async def paid_chat(
    client: AsyncOpenAI,
    consumer: DrainConsumer,
    *,
    budget: int = 100_000,
    content: str = "Hello, provider!",
    model: str = DEMO_MODEL,
    **kwargs: Any,
) -> Any:
    """One paid chat completion through the openai SDK; returns the raw response."""
    voucher = consumer.next_voucher(budget)
    raw = await client.chat.completions.with_raw_response.create(
        model=model,
        messages=[{"role": "user", "content": content}],
        extra_headers={"X-DRAIN-Voucher": voucher.header_value()},
        **kwargs,
    )
    consumer.record(raw.headers)
    return raw


# --- anvil: the JSON-RPC path ----------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent
ANVIL = REPO / "node_modules" / ".bin" / "anvil"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def anvil_url() -> Iterator[str]:
    """A real anvil node (installed by `npm install`) for the whole session."""
    assert ANVIL.exists(), "anvil is missing: run `npm install`"
    port = _free_port()
    proc = subprocess.Popen(
        [str(ANVIL), "--port", str(port), "--silent"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "anvil did not start"
            time.sleep(0.05)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@dataclass
class RpcProxy:
    """A JSON-RPC proxy in front of a node: counts the calls by method, and can fail some."""

    target: str
    calls: list[str] = field(default_factory=list)
    fail_next: int = 0  # answer 502 without forwarding
    lose_next: int = 0  # forward, then answer 502: the node acted, the caller cannot know
    hold: set[str] = field(default_factory=set)  # methods that get no answer until released
    released: asyncio.Event = field(default_factory=asyncio.Event)
    server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("/"))

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        payload = json.loads(body)
        methods = [p["method"] for p in payload] if isinstance(payload, list) else [payload["method"]]
        self.calls.extend(methods)
        if self.fail_next > 0:
            self.fail_next -= 1
            return web.Response(status=502, text="proxy: injected failure")
        if self.hold.intersection(methods):
            await self.released.wait()
        async with (
            aiohttp.ClientSession() as session,
            session.post(self.target, data=body, headers={"Content-Type": "application/json"}) as resp,
        ):
            answer = await resp.read()
        if self.lose_next > 0:
            self.lose_next -= 1
            return web.Response(status=502, text="proxy: answer lost")
        return web.Response(body=answer, status=resp.status, content_type="application/json")


@pytest.fixture
async def rpc_proxy(anvil_url: str, aiohttp_server: Callable[..., Awaitable[TestServer]]) -> RpcProxy:
    proxy = RpcProxy(anvil_url)
    app = web.Application()
    app.router.add_post("/", proxy.handle)
    proxy.server = await aiohttp_server(app)
    return proxy


@pytest.fixture
async def anvil_chain(anvil_url: str) -> AsyncIterator[DevChain]:
    """Fresh contracts on the session's anvil node."""
    dev_chain = await attach_dev_node(anvil_url)
    yield dev_chain
    await dev_chain.close()
