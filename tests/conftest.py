"""Real parts for every test: one embedded EVM with our contracts for the session, the demo
upstream served over HTTP on a free port, the provider app served on another, the official
openai SDK, and anvil for the JSON-RPC path. Shared types and helpers are in helpers.py."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from eth_account import Account
from helpers import (
    FEE_BPS,
    REPO,
    USDC,
    ChannelFactory,
    Provider,
    ProviderFactory,
    RpcProxy,
    Upstream,
    amoy_replica,
    anvil_node,
    make_settings,
)

from bench.postgres_server import PostgresServer, running_server
from drain_provider.api import RUNNER_OPTIONS, create_app
from drain_provider.chain import ChainClient
from drain_provider.consumer import DrainConsumer
from drain_provider.devtools.demo_upstream import DEMO_STATS, create_demo_upstream
from drain_provider.devtools.devchain import DevChain, attach_dev_node, start_embedded_chain
from drain_provider.ledger import Ledger, make_ledger
from drain_provider.tokens import TokenCounter

ServerFactory = Callable[..., Awaitable[TestServer]]

# Subprocesses (`python -m drain_provider ...`, often run from a temporary directory) import this
# checkout, not whichever one the virtualenv has installed (a git worktree shares its venv).
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)


@pytest.fixture(scope="session")
async def chain() -> AsyncIterator[DevChain]:
    """One embedded chain for the session; every test uses fresh keys and channels on it."""
    dev_chain = await start_embedded_chain()
    yield dev_chain
    await dev_chain.close()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL server for this test process, started on first use (bench/postgres_server.py)."""
    with running_server() as server:
        yield server


@pytest.fixture
def engine(request: pytest.FixtureRequest) -> str:
    """The ledger engine of this test: `sqlite` unless parametrized. A module whose tests must hold
    on both engines says `pytestmark = pytest.mark.parametrize("engine", ENGINES, indirect=True)`
    (helpers.ENGINES): its providers (provider_factory) and ledgers (`new_ledger`) use each in turn."""
    return str(getattr(request, "param", "sqlite"))


@pytest.fixture
async def database_urls(request: pytest.FixtureRequest) -> AsyncIterator[Callable[[], Awaitable[str]]]:
    """Makes fresh PostgreSQL databases for this test (dropped at its end)."""
    made: list[str] = []
    server: PostgresServer | None = None

    async def make() -> str:
        nonlocal server
        server = server or request.getfixturevalue("postgres_server")
        made.append(await server.create_database())
        return made[-1]

    yield make
    for url in made:
        assert server is not None
        await server.drop_database(url)


@pytest.fixture
async def new_ledger(
    engine: str, tmp_path: Path, database_urls: Callable[[], Awaitable[str]]
) -> AsyncIterator[Callable[[], Awaitable[Ledger]]]:
    """Opens fresh, empty ledgers of this test's engine (closed at its end)."""
    opened: list[Ledger] = []

    async def open_() -> Ledger:
        if engine == "postgresql":
            ledger: Ledger = make_ledger(tmp_path, url=await database_urls())
        else:
            ledger = make_ledger(tmp_path / f"ledger{len(opened)}.db")
        await ledger.open()
        opened.append(ledger)
        return ledger

    yield open_
    for ledger in opened:
        await ledger.close()


@pytest.fixture
async def fee_chain(chain: DevChain) -> DevChain:
    """A fresh V2 DrainChannel on the session chain, taking V2's 2 % fee from every payout (for the
    funder), beside the session chain's contracts."""
    return await chain.fresh_contract(fee_bps=FEE_BPS)


@pytest.fixture
async def upstream(aiohttp_server: ServerFactory) -> Upstream:
    app = create_demo_upstream()
    server = await aiohttp_server(app)
    return Upstream(server, app[DEMO_STATS])


@pytest.fixture
async def provider_factory(
    chain: DevChain,
    engine: str,
    database_urls: Callable[[], Awaitable[str]],  # before the servers: their databases outlive them
    upstream: Upstream,
    aiohttp_server: ServerFactory,
    tmp_path: Path,
) -> AsyncIterator[ProviderFactory]:
    started: list[Provider] = []

    async def start(
        chain_client: ChainClient | None = None,
        on: DevChain | None = None,
        fund: bool = True,
        counter: TokenCounter | None = None,
        v1: bool = False,
        **overrides: Any,
    ) -> Provider:
        """A provider app served on a free port, for the V2 contract of `on` (default: the
        embedded chain), and its V1 contract too if `v1`, read through `chain_client`'s connection
        (default: directly), counting tokens with `counter` (default: its own); `overrides`
        replace Settings fields."""
        dev_chain = on or chain
        if v1:
            overrides.setdefault("contracts", dev_chain.contracts)
        if engine == "postgresql" and "database_url" not in overrides:
            overrides["database_url"] = await database_urls()
        settings = make_settings(dev_chain, upstream.url, tmp_path / f"ledger{len(started)}.db", **overrides)
        if fund:  # gas money for claims
            await dev_chain.fund(settings.provider_address)
        app = create_app(settings, chain=chain_client or dev_chain.client(), counter=counter)
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


@pytest.fixture
def open_channel(chain: DevChain) -> ChannelFactory:
    """Open a funded channel from a fresh consumer to `provider` (a Provider or an address), on
    the V2 contract of `on` (default: the embedded chain), or on its V1 contract (`version="v1"`)."""

    async def open_(
        provider: Provider | str,
        *,
        deposit: int = 10 * USDC,
        duration: int = 86_400,
        on: DevChain | None = None,
        version: str = "v2",
    ) -> DrainConsumer:
        dev_chain = on or chain
        address = provider.address if isinstance(provider, Provider) else provider
        key = bytes(Account.create().key)
        await dev_chain.fund(Account.from_key(key).address, usdc=deposit)
        consumer = await DrainConsumer.open_channel(
            dev_chain.w3,
            dev_chain.client(version).address,
            key,
            address,
            deposit=deposit,
            duration=duration,
            token=dev_chain.token,
        )
        if isinstance(provider, Provider):
            consumer.api = provider.url
        return consumer

    return open_


# --- anvil: the JSON-RPC path ----------------------------------------------------------------


@pytest.fixture(scope="session")
def anvil_url() -> Iterator[str]:
    """A real anvil node (installed by `npm install`) for the whole session."""
    with anvil_node() as url:
        yield url


@pytest.fixture
async def rpc_proxy(anvil_url: str, aiohttp_server: ServerFactory) -> RpcProxy:
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


@pytest.fixture(scope="module")
def amoy_url() -> Iterator[str]:
    """An anvil node with Amoy's chain id, for one test module."""
    with anvil_node("--chain-id", "80002") as url:
        yield url


@pytest.fixture(scope="module")
async def amoy(amoy_url: str) -> AsyncIterator[DevChain]:
    """A replica of Amoy on `amoy_url` (helpers.amoy_replica): its `contract` and `token` are
    Amoy's V2 DrainChannel and USDC addresses."""
    chain = await amoy_replica(amoy_url)
    yield chain
    await chain.close()
