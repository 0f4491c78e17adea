"""What the tests share besides fixtures (those are in conftest.py): the records the fixtures
return, the factories' types, a paid call through the openai SDK, and a JSON-RPC proxy that
counts and breaks calls. Imported as `from helpers import ...` (pytest puts tests/ on the path).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import tiktoken
from aiohttp import web
from aiohttp.test_utils import TestServer
from eth_account import Account
from eth_account.messages import encode_typed_data
from openai import AsyncOpenAI

from drain_provider.api.state import CLAIMER, LEDGER, WATCHER
from drain_provider.chainwatch import ChainWatcher
from drain_provider.claimer import Claimer
from drain_provider.config import Settings
from drain_provider.consumer import DrainConsumer
from drain_provider.devtools.demo_upstream import DEMO_MODEL, DemoStats
from drain_provider.devtools.devchain import DevChain, attach_dev_node
from drain_provider.ledger import Ledger
from drain_provider.logs import (
    BAD_REQUEST_LINES,
    BAD_REQUEST_WINDOW,
    SERVER_LOGGER,
    BadRequestFilter,
    RateLimit,
    quiet_bad_requests,
)
from drain_provider.pricing import ModelPrice
from drain_provider.protocol import DEPLOYMENTS, EIP712_TYPES, Domain
from drain_provider.tokens import TokenCounter

DEMO_PRICE = ModelPrice(input_per_1k=1000, output_per_1k=2000)
USDC = 1_000_000
FEE_BPS = 200  # the Amoy V2 deployment's 2 %
REPO = Path(__file__).resolve().parent.parent
ANVIL = REPO / "node_modules" / ".bin" / "anvil"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def anvil_node(*options: str) -> Iterator[str]:
    """A real anvil node (installed by `npm install`) on a free port, with `options`; its URL."""
    assert ANVIL.exists(), "anvil is missing: run `npm install`"
    port = free_port()
    proc = subprocess.Popen(
        [str(ANVIL), "--port", str(port), "--silent", *options], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "anvil did not start"
            time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def amoy_replica(rpc_url: str) -> DevChain:
    """Amoy on a dev node with chain id 80002: our token and contract, deployed, then copied to
    Amoy's USDC, V2 and V1 addresses: the code (with the contract's immutable domain separator
    made the copy's own) and the storage (its token pointing at the copy of the token). A
    provider configured by CHAIN_ID=80002 alone serves it as it would serve Amoy."""
    amoy = DEPLOYMENTS[80002]
    chain = await attach_dev_node(rpc_url)
    rpc = chain.w3.provider

    async def call(method: str, *params: Any) -> Any:
        answer = await rpc.make_request(method, list(params))
        assert "error" not in answer, answer
        return answer["result"]

    await call("anvil_setCode", amoy.usdc, await call("eth_getCode", chain.token, "latest"))
    code = await call("eth_getCode", chain.contract, "latest")
    deployed_separator = Domain(80002, chain.contract).separator.hex()
    token_word = "0x" + chain.token[2:].lower().rjust(64, "0")
    for address in (amoy.v2, amoy.v1):
        own = code.replace(deployed_separator, Domain(80002, address).separator.hex())
        assert own != code
        await call("anvil_setCode", address, own)
        for slot in range(8):
            word = await call("eth_getStorageAt", chain.contract, hex(slot), "latest")
            if int(word, 16):
                word = "0x" + amoy.usdc[2:].lower().rjust(64, "0") if word == token_word else word
                await call("anvil_setStorageAt", address, hex(slot), "0x" + word[2:].rjust(64, "0"))
    return replace(chain, contract=amoy.v2, token=amoy.usdc)


async def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


@dataclass
class Upstream:
    server: TestServer
    stats: DemoStats

    @property
    def url(self) -> str:
        return str(self.server.make_url("/v1"))


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

    @property
    def watcher(self) -> ChainWatcher:
        return self.app[WATCHER]

    def client(self) -> AsyncOpenAI:
        """An openai SDK client for this provider (closed when the test ends)."""
        client = AsyncOpenAI(base_url=self.url, api_key="unused", max_retries=0)
        self.clients.append(client)
        return client


ProviderFactory = Callable[..., Awaitable[Provider]]
ChannelFactory = Callable[..., Awaitable[DrainConsumer]]


# The ledger's engines, for `pytest.mark.parametrize("engine", ENGINES, indirect=True)`.
ENGINES = ("sqlite", "postgresql")


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


def consumer_request(
    consumer: DrainConsumer, action: str, *, timestamp: int | None = None, key: bytes | None = None
) -> dict[str, Any]:
    """The consumer's signed request about its channel, `{"timestamp", "signature"}`, signed as a
    wallet would: eth-account's generic EIP-712 encoder (by `key`, to sign as someone else)."""
    stamp = int(time.time()) if timestamp is None else timestamp
    message = {"channelId": bytes.fromhex(consumer.channel_id[2:]), "action": action, "timestamp": stamp}
    typed = encode_typed_data(consumer.domain.as_json(), {"ConsumerRequest": EIP712_TYPES["ConsumerRequest"]}, message)
    signed = Account.sign_message(typed, consumer.account.key if key is None else key)
    return {"timestamp": stamp, "signature": "0x" + bytes(signed.signature).hex()}


async def call(
    provider: Provider, method: str, path: str, *, data: bytes | None = None, params: dict[str, Any] | None = None
) -> tuple[int, Any, Mapping[str, str]]:
    """One plain HTTP call to the provider's API (`path` after /v1): status, JSON body, headers."""
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method, provider.url + path, data=data, params=params, headers={"Content-Type": "application/json"}
        ) as response,
    ):
        return response.status, await response.json(), response.headers


class CountingEncoding:
    """The real encoding of gpt-4o (offline: cl100k_base), with its calls and the bytes it encoded
    counted, for tests of how much counting costs."""

    def __init__(self) -> None:
        self.inner = TokenCounter().encoding("gpt-4o")
        self.calls = 0
        self.name = self.inner.name
        self.encoded_bytes = 0  # the UTF-8 bytes of every text encoded
        self.threads: set[str] = set()  # the threads that encoded

    def encode(self, text: str, disallowed_special: tuple[str, ...] = ()) -> list[int]:
        self.calls += 1
        self.encoded_bytes += len(text.encode())
        self.threads.add(threading.current_thread().name)
        return self.inner.encode(text, disallowed_special=disallowed_special)

    def decode_bytes(self, tokens: list[int]) -> bytes:
        return self.inner.decode_bytes(tokens)

    def token_byte_values(self) -> list[bytes]:
        return self.inner.token_byte_values()


class CountingCounter(TokenCounter):
    """The provider's real token counter, for every model with the CountingEncoding above: what
    a provider app counts, how much, and on which threads, can be seen."""

    def __init__(self) -> None:
        super().__init__()
        self.spy = CountingEncoding()

    def encoding(self, model: str) -> tiktoken.Encoding:
        return self.spy  # type: ignore[return-value]


async def refused_chat(client: AsyncOpenAI, consumer: DrainConsumer, **kwargs: Any) -> openai.APIStatusError:
    """A paid chat completion the provider must refuse; its error (X-DRAIN-Error says why)."""
    with pytest.raises(openai.APIStatusError) as info:
        await paid_chat(client, consumer, **kwargs)
    return info.value


@dataclass
class RpcProxy:
    """A JSON-RPC proxy in front of a node: counts the calls by method, and can fail some."""

    target: str
    calls: list[str] = field(default_factory=list)
    fail_next: int = 0  # answer 502 without forwarding
    lose_next: int = 0  # forward, then answer 502: the node acted, the caller cannot know
    hold: set[str] = field(default_factory=set)  # methods that get no answer until released
    answers: dict[str, Any] = field(default_factory=dict)  # method -> a result given instead of the node's
    fail_calls_to: set[str] = field(default_factory=set)  # eth_call to these addresses (lower case): 502
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
        called = payload["params"][0].get("to", "") if isinstance(payload, dict) and methods == ["eth_call"] else ""
        if str(called).lower() in self.fail_calls_to:
            return web.Response(status=502, text="proxy: injected failure")
        if self.hold.intersection(methods):
            await self.released.wait()
        if isinstance(payload, dict) and payload["method"] in self.answers:
            result = self.answers[payload["method"]]
            return web.json_response({"jsonrpc": "2.0", "id": payload["id"], "result": result})
        async with (
            aiohttp.ClientSession() as session,
            session.post(self.target, data=body, headers={"Content-Type": "application/json"}) as resp,
        ):
            answer = await resp.read()
        if self.lose_next > 0:
            self.lose_next -= 1
            return web.Response(status=502, text="proxy: answer lost")
        return web.Response(body=answer, status=resp.status, content_type="application/json")


def fresh_bad_request_budget() -> None:
    """The quiet filter of malformed requests is one per process: a test that counts its lines
    starts a rate-limit window of its own."""
    quiet_bad_requests()
    for installed in logging.getLogger(SERVER_LOGGER).filters:
        if isinstance(installed, BadRequestFilter):
            installed.limit = RateLimit(BAD_REQUEST_LINES, BAD_REQUEST_WINDOW)
