"""`python -m drain_provider dev`: the whole DRAIN flow on this machine, nothing to configure.

Starts a chain (embedded, `--rpc-url`, or `--anvil`: an anvil it starts, so that programs
outside this process have a JSON-RPC to open channels over), deploys the test token and the channel contracts (V2
and V1, both served),
funds a demo consumer and opens a channel to a throwaway provider key, starts the provider
(with the built-in demo model unless UPSTREAM_BASE_URL / OPENAI_API_KEY name a real one),
proves the flow with one paid call, then prints and writes to data/dev.json what a person needs
to call it.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from eth_account import Account

from ..api import create_app
from ..config import ConfigError, Settings, load_settings
from ..consumer import DrainConsumer
from ..logs import setup_logging
from ..pricing import ModelPrice
from ..privatefile import write_private
from ..protocol import Domain
from ..server import Listener, Signals
from .anvil import start_anvil
from .demo_upstream import DEMO_MODEL, create_demo_upstream
from .devchain import DevChain, attach_dev_node, start_embedded_chain

DEV_DATABASE = "data/dev.db"
DEV_FILE = Path("data/dev.json")
DEMO_PRICE = ModelPrice(input_per_1k=1000, output_per_1k=2000)  # $0.001 / $0.002 per 1k tokens
CONSUMER_USDC = 100_000_000  # 100 test USDC minted to the demo consumer
CHANNEL_DEPOSIT = 10_000_000  # 10 USDC locked in the demo channel
CHANNEL_DURATION = 7 * 86_400


async def _serve_demo_upstream() -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(create_demo_upstream(), access_log=None, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}/v1"


def dev_settings(env: dict[str, str], chain: DevChain, provider_key: bytes, upstream_url: str | None) -> Settings:
    """The environment's settings, with the chain, keys and ledger of this dev run."""
    overrides = {
        "PROVIDER_PRIVATE_KEY": "0x" + provider_key.hex(),
        "PROVIDER_KEYSTORE": "",  # dev's own throwaway key, never the .env's keystore (nor its scrypt)
        "PROVIDER_KEYSTORE_PASSWORD_FILE": "",
        "CHAIN_ID": str(chain.chain_id),
        "DRAIN_CONTRACT": chain.contract,
        "DRAIN_CONTRACT_V1": chain.contract_v1,  # both served, as on Polygon and Amoy
        "RPC_URL": chain.rpc_url or "http://embedded.invalid",
        "HOST": env.get("HOST") or "127.0.0.1",
        "DATABASE_PATH": env.get("DATABASE_PATH") or DEV_DATABASE,
        # One developer on loopback, whose mistakes are refused payments: no limit on them.
        "PAYMENT_FAILURES_PER_MINUTE": env.get("PAYMENT_FAILURES_PER_MINUTE") or "0",
    }
    if upstream_url is not None:
        overrides["UPSTREAM_BASE_URL"] = upstream_url
    settings = load_settings({**env, **overrides})
    prices = {DEMO_MODEL: DEMO_PRICE} if upstream_url is not None else dict(settings.prices)
    return replace(settings, rpc_url=chain.rpc_url, prices=prices)


async def _paid_call(api: str, consumer: DrainConsumer, model: str, price: ModelPrice) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": "Hello from drain-provider dev mode!"}],
        "max_tokens": 256,
    }
    voucher = consumer.voucher_for(body, price)  # exactly what this request may cost
    headers = {"X-DRAIN-Voucher": voucher.header_value()}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{api}/chat/completions", json=body, headers=headers) as resp,
    ):
        answer = await resp.json()
        if resp.status != 200:
            raise RuntimeError(f"the demo paid call failed: {resp.status} {answer}")
        consumer.record(resp.headers)
        return {"answer": answer, "headers": dict(resp.headers)}


def kit_command(api: str, rpc_url: str | None) -> str | None:
    """The consumer kit's `open` against this dev run (the key is the demo consumer's), when
    the chain has a JSON-RPC outside clients can reach."""
    if rpc_url is None:
        return None
    root = api.removesuffix("/v1")
    return f"python -m drain_provider.consumer open --provider {root} --deposit 5 --rpc-url {rpc_url}"


def write_dev_file(path: Path, api: str, chain: DevChain, settings: Settings, consumer: DrainConsumer) -> None:
    facts = {
        "api": api,
        "chainId": chain.chain_id,
        "rpcUrl": chain.rpc_url,
        "contract": chain.contract,
        "contracts": [{"address": ref.address, "version": ref.version} for ref in settings.contracts],
        "token": chain.token,
        "provider": settings.provider_address,
        "consumer": {"address": consumer.address, "privateKey": "0x" + bytes(consumer.account.key).hex()},
        "consumerKit": kit_command(api, chain.rpc_url),  # with CONSUMER_PRIVATE_KEY=<consumer.privateKey>
        "channelId": consumer.channel_id,
        "deposit": str(consumer.deposit),
        "lastNonce": str(consumer.nonce),
        "lastAmount": str(consumer.amount),
    }
    write_private(path, json.dumps(facts, indent=2) + "\n")


def load_dev_consumer(path: str | Path = DEV_FILE) -> DrainConsumer:
    """The demo consumer of a running `python -m drain_provider dev`, where it left off."""
    facts = json.loads(Path(path).read_text())
    return DrainConsumer(
        account=Account.from_key(facts["consumer"]["privateKey"]),
        domain=Domain(int(facts["chainId"]), facts["contract"]),
        channel_id=facts["channelId"],
        deposit=int(facts["deposit"]),
        nonce=int(facts["lastNonce"]),
        amount=int(facts["lastAmount"]),
        api=facts["api"],
    )


def save_dev_consumer(consumer: DrainConsumer, path: str | Path = DEV_FILE) -> None:
    """Record the last signed nonce and amount, so the next call continues the channel."""
    facts = json.loads(Path(path).read_text())
    facts["lastNonce"], facts["lastAmount"] = str(consumer.nonce), str(consumer.amount)
    write_private(Path(path), json.dumps(facts, indent=2) + "\n")


def _forget_last_dev_ledger() -> None:
    """A new chain: the ledger of the last dev run means nothing (a few small unlinks, before
    anything is served). A file where data/ should be is left for the ledger's own one-line error."""
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            Path(DEV_DATABASE + suffix).unlink()


async def _start_chain(rpc_url: str | None) -> DevChain:
    """The embedded chain, or the contracts deployed on the dev node at `rpc_url`."""
    if rpc_url is None:
        return await start_embedded_chain()
    try:
        return await attach_dev_node(rpc_url)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:  # ValueError: web3's answer to a non-node
        raise ConfigError(
            f"--rpc-url: no dev node with an unlocked account answers there ({type(exc).__name__})"
        ) from None


async def run_dev(
    env: dict[str, str],
    *,
    rpc_url: str | None,
    port: int | None,
    serve: bool,
    started: float | None,
    anvil_port: int | None = None,
) -> int:
    """`anvil_port`: start anvil there (`--anvil`) and use it as the dev node."""
    started = started or time.monotonic()
    setup_logging(env.get("LOG_LEVEL", "WARNING").upper(), fmt="%(levelname)s %(name)s %(message)s")
    async with contextlib.AsyncExitStack() as stack:  # whatever fails, what was started is stopped
        if anvil_port is not None:  # stopped last: the provider may still read the chain as it stops
            node = await start_anvil(anvil_port)
            stack.push_async_callback(node.stop)
            rpc_url = node.url
        chain = await _start_chain(rpc_url)
        stack.push_async_callback(chain.close)
        provider_key = bytes(Account.create().key)
        consumer_key = bytes(Account.create().key)
        use_demo = not (env.get("UPSTREAM_BASE_URL") or env.get("OPENAI_API_KEY"))
        demo_url = None
        if use_demo:
            demo_runner, demo_url = await _serve_demo_upstream()
            stack.push_async_callback(demo_runner.cleanup)

        if not env.get("DATABASE_PATH"):
            _forget_last_dev_ledger()
        settings = dev_settings(env, chain, provider_key, demo_url)
        if port is not None:
            settings = replace(settings, port=port)
        await chain.fund(settings.provider_address)
        consumer_address = Account.from_key(consumer_key).address
        await chain.fund(consumer_address, usdc=CONSUMER_USDC)

        listener = Listener(
            create_app(settings, chain=chain.client()),
            settings.host,
            settings.port,
            max_connections=settings.max_connections,
            header_timeout=settings.header_timeout,
        )
        stack.push_async_callback(listener.stop)
        await listener.start()
        api = f"http://{settings.host}:{settings.port}/v1"
        consumer = await DrainConsumer.open_channel(
            chain.w3,
            chain.contract,
            consumer_key,
            settings.provider_address,
            deposit=CHANNEL_DEPOSIT,
            duration=CHANNEL_DURATION,
            token=chain.token,
        )
        model = DEMO_MODEL if use_demo else sorted(settings.prices)[0]
        call = await _paid_call(api, consumer, model, settings.prices[model])
        ready = time.monotonic() - started
        write_dev_file(DEV_FILE, api, chain, settings, consumer)
        print(_banner(api, chain, settings, consumer, model, call, ready, anvil=anvil_port is not None))
        if serve:
            with Signals() as signals:  # SIGINT, SIGTERM or a terminal's SIGHUP
                await signals.wait()
    return 0


def _outside_clients(api: str, chain: DevChain, consumer: DrainConsumer) -> str:
    command = kit_command(api, chain.rpc_url)
    if command is None:
        return "  (the embedded chain has no JSON-RPC for other programs: `dev --anvil` gives them one)\n"
    key = "0x" + bytes(consumer.account.key).hex()
    return f"""
Pay it from another program (viem, the MCP server, the consumer kit) over the chain's JSON-RPC:
  rpc        {chain.rpc_url}   chain id {chain.chain_id}   token {chain.token}
  export CONSUMER_PRIVATE_KEY={key}   # the demo consumer's key
  {command}
  python -m drain_provider.consumer chat "Hello!"
"""


def _banner(
    api: str,
    chain: DevChain,
    settings: Settings,
    consumer: DrainConsumer,
    model: str,
    call: dict[str, Any],
    ready: float,
    *,
    anvil: bool,
) -> str:
    content = call["answer"]["choices"][0]["message"]["content"]
    headers = call["headers"]
    where = chain.rpc_url or "embedded py-evm chain (in this process)"
    if anvil:
        where += " (anvil, started by dev)"
        ends = "anvil, its chain and its channels end with dev"
    else:
        ends = (
            "the embedded chain and its channels end with the process" if chain.rpc_url is None else "the node goes on"
        )
    contracts = "\n".join(f"  contract   {ref.address} ({ref.version})" for ref in settings.contracts)
    return f"""
drain-provider dev mode: ready in {ready:.2f} s
  chain      {where}, chain id {chain.chain_id}
{contracts}
  token      {chain.token} (test USDC)
  provider   {settings.provider_address}
  upstream   {settings.upstream_base_url}{" (built-in demo model)" if model == DEMO_MODEL else ""}

Demo paid call ({model}):
  answer     {content}
  cost       {headers["X-DRAIN-Cost"]} base units (X-DRAIN-Total {headers["X-DRAIN-Total"]}, \
X-DRAIN-Remaining {headers["X-DRAIN-Remaining"]})

Call it yourself (facts in {DEV_FILE}):
  endpoint   {api}
  consumer   {consumer.address}  key {"0x" + bytes(consumer.account.key).hex()}
  channel    {consumer.channel_id}  (deposit {consumer.deposit} base units, last nonce {consumer.nonce})

pip install openai   # once: the snippet uses the official SDK, paid through the consumer kit
python - <<'EOF'
from openai import OpenAI
from drain_provider.consumer.transport import drain_http_client
from drain_provider.devtools.dev import load_dev_consumer, save_dev_consumer
consumer = load_dev_consumer("{DEV_FILE}")
client = OpenAI(base_url=consumer.api, api_key="drain", http_client=drain_http_client(consumer))
answer = client.chat.completions.create(model="{model}", messages=[{{"role": "user", "content": "Hi!"}}])
save_dev_consumer(consumer, "{DEV_FILE}")
print(answer.choices[0].message.content, "| cost", consumer.last_cost)
EOF
{_outside_clients(api, chain, consumer)}
Press Ctrl-C to stop ({ends}).
"""
