"""`python -m drain_provider dev`: the whole DRAIN flow on this machine, nothing to configure.

Starts a chain (embedded, `--rpc-url`, or `--anvil`: an anvil it starts, so that programs
outside this process have a JSON-RPC to open channels over), deploys the test token and the
channel contracts (V2 and V1, both served), funds a demo consumer and opens a channel to a
throwaway provider key, starts the provider with the built-in demo model, proves the flow with
one paid call, then prints and writes to data/dev.json what a person needs to call it.

It stays self-contained whatever the directory holds: `.env` and the environment's settings
(the upstream and its key, the provider key, HOST, PORT, the chain, the ledger, the prices)
are not read, because a production `.env` next to it must not turn a demo into calls to a paid
upstream or into a start-up error. `--upstream URL` sells one model of a real OpenAI-compatible
upstream instead; `--env` reads `.env` and the environment as `serve` does, but for what dev
must own whatever they say (`DEV_OWNED`: its chain, its key, its ledger, loopback).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from eth_account import Account

from ..api import create_app
from ..catalog import Kind
from ..config import SETTINGS, ConfigError, Settings, _url, load_settings
from ..consumer import DrainConsumer
from ..logs import redact, setup_logging
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
DEFAULT_UPSTREAM_MODEL = "gpt-4o-mini"  # what --upstream sells unless --model names another
DEFAULT_KEY_ENV = "OPENAI_API_KEY"
# What dev decides itself, even with --env (a setting's name starts with one of these): its own
# chain and contracts, its throwaway provider key (and no keystore), a ledger of its own (each run
# is a new chain), and loopback only.
DEV_OWNED = (
    "PROVIDER_",
    "CHAIN_ID",
    "RPC_URL",
    "DRAIN_CONTRACT",
    "HOST",
    "DATABASE_PATH",
    "DATABASE_URL",  # never a production PostgreSQL ledger from .env
    "STORAGE_PATH",
)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class DevOptions:
    """The `dev` command line."""

    rpc_url: str | None = None
    anvil_port: int | None = None  # start anvil there (`--anvil`) and use it as the dev node
    port: int | None = None
    serve: bool = True
    read_env: bool = False  # --env
    upstream: str | None = None  # --upstream: an OpenAI-compatible base URL instead of the demo model
    upstream_key_env: str | None = None  # --upstream-key-env: the variable holding its key
    model: str | None = None  # --model: the upstream's model sold

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DevOptions:
        return cls(
            rpc_url=args.rpc_url,
            anvil_port=args.anvil_port if args.anvil else None,
            port=args.port,
            serve=not args.no_serve,
            read_env=args.env,
            upstream=args.upstream,
            upstream_key_env=args.upstream_key_env,
            model=args.model,
        )


@dataclass(frozen=True)
class DevUpstream:
    """Where dev's paid calls go, and how that was decided (for the banner)."""

    url: str | None  # None: the built-in demo model, which dev starts
    model: str | None  # the one model sold, at the demo price; None: the settings' prices (--env)
    origin: str


def _setting_names() -> set[str]:
    return {name for setting in SETTINGS for name in (setting.name, *setting.aliases)}


def _is_setting(name: str) -> bool:
    return name in _setting_names() or name.startswith("PRICE_")


def _dev_owned(name: str) -> bool:
    return name.startswith(DEV_OWNED)


def dev_environment(
    environment: Mapping[str, str], options: DevOptions
) -> tuple[dict[str, str], DevUpstream, list[str]]:
    """From `environment` (the process environment over `.env`, as `read_environment` gives it):
    the settings dev loads, where its paid calls go, and the names of the settings set there
    that it leaves alone (the banner lists them, never their values)."""
    if options.upstream is None and (options.upstream_key_env is not None or options.model is not None):
        flag = "--upstream-key-env" if options.upstream_key_env is not None else "--model"
        raise ConfigError(f"{flag}: only with --upstream URL")
    set_here = sorted(name for name, value in environment.items() if value.strip() and _is_setting(name))
    if options.read_env:
        env = {name: value for name, value in environment.items() if not _dev_owned(name)}
        unused = [name for name in set_here if _dev_owned(name)]
    else:
        env, unused = {}, [name for name in set_here if name != "LOG_LEVEL"]
    if options.upstream is not None:
        url = _url("--upstream", options.upstream.strip())
        key_env = options.upstream_key_env or DEFAULT_KEY_ENV
        if not _ENV_NAME.fullmatch(key_env):
            raise ConfigError("--upstream-key-env: must be the name of an environment variable")
        key = environment.get(key_env, "").strip()
        if not key and options.upstream_key_env is not None:
            raise ConfigError(f"--upstream-key-env: {key_env} is not set (in the environment or .env)")
        env.pop("OPENAI_API_KEY", None)
        env.update({"UPSTREAM_BASE_URL": url, **({"OPENAI_API_KEY": key} if key else {})})
        unused = [name for name in unused if name != key_env]
        model = options.model or DEFAULT_UPSTREAM_MODEL
        origin = f"--upstream, selling {model}; " + (f"key from {key_env}" if key else f"no key ({key_env} unset)")
        return env, DevUpstream(url, model, origin), unused
    if options.read_env and (env.get("UPSTREAM_BASE_URL", "").strip() or env.get("OPENAI_API_KEY", "").strip()):
        return env, DevUpstream(None, None, "--env: from .env and the environment"), unused
    return env, DevUpstream(None, DEMO_MODEL, "demo"), unused


async def _serve_demo_upstream() -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(create_demo_upstream(), access_log=None, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}/v1"


def dev_settings(
    env: Mapping[str, str], chain: DevChain, provider_key: bytes, upstream_url: str | None, model: str = DEMO_MODEL
) -> Settings:
    """`env`'s settings, with the chain, keys and ledger of this dev run. With `upstream_url`,
    that upstream sells `model` alone, at the demo price; without, the settings' upstream and
    prices."""
    overrides = {
        "PROVIDER_PRIVATE_KEY": "0x" + provider_key.hex(),
        "PROVIDER_KEYSTORE": "",  # dev's own throwaway key, never the .env's keystore (nor its scrypt)
        "PROVIDER_KEYSTORE_PASSWORD_FILE": "",
        "CHAIN_ID": str(chain.chain_id),
        "DRAIN_CONTRACT": chain.contract,
        "DRAIN_CONTRACT_V1": chain.contract_v1,  # both served, as on Polygon and Amoy
        "RPC_URL": chain.rpc_url or "http://embedded.invalid",
        "HOST": "127.0.0.1",  # a dev chain's provider has no business on a public interface
        "DATABASE_PATH": env.get("DATABASE_PATH") or DEV_DATABASE,
        # One developer on loopback, whose mistakes are refused payments: no limit on them.
        "PAYMENT_FAILURES_PER_MINUTE": env.get("PAYMENT_FAILURES_PER_MINUTE") or "0",
    }
    if upstream_url is not None:  # that upstream alone: a routing or pricing file of --env's does not apply
        overrides.update(UPSTREAM_BASE_URL=upstream_url, MODELS_FILE="", PRICING_FILE="")
    settings = load_settings({**env, **overrides})
    prices = {model: DEMO_PRICE} if upstream_url is not None else dict(settings.prices)
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
        if resp.status != 200:  # a real upstream (--upstream, --env) that is down, or refuses its key or model
            error = answer.get("error", {}) if isinstance(answer, dict) else {}
            raise ConfigError(
                f"the demo paid call to {model} failed: {resp.status} {error.get('code')}: {error.get('message')} "
                "(check the upstream's URL, key and model)"
            )
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


async def run_dev(environment: Mapping[str, str], options: DevOptions, *, started: float | None = None) -> int:
    """`environment`: the process environment over `.env`; what of it is used, `dev_environment` decides."""
    started = started or time.monotonic()
    env, upstream, unused = dev_environment(environment, options)
    level = (environment if options.read_env else os.environ).get("LOG_LEVEL") or "WARNING"
    setup_logging(level.upper(), fmt="%(levelname)s %(name)s %(message)s")
    rpc_url = options.rpc_url
    async with contextlib.AsyncExitStack() as stack:  # whatever fails, what was started is stopped
        if options.anvil_port is not None:  # stopped last: the provider may still read the chain as it stops
            node = await start_anvil(options.anvil_port)
            stack.push_async_callback(node.stop)
            rpc_url = node.url
        chain = await _start_chain(rpc_url)
        stack.push_async_callback(chain.close)
        provider_key = bytes(Account.create().key)
        consumer_key = bytes(Account.create().key)
        upstream_url = upstream.url
        if upstream.model == DEMO_MODEL:
            demo_runner, upstream_url = await _serve_demo_upstream()
            stack.push_async_callback(demo_runner.cleanup)

        _forget_last_dev_ledger()
        settings = dev_settings(env, chain, provider_key, upstream_url, upstream.model or DEMO_MODEL)
        if options.port is not None:
            settings = replace(settings, port=options.port)
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
        model = upstream.model or next(r.name for r in settings.catalog.routes.values() if r.kind is Kind.CHAT)
        call = await _paid_call(api, consumer, model, settings.prices[model])
        ready = time.monotonic() - started
        write_dev_file(DEV_FILE, api, chain, settings, consumer)
        run = DevRun(api, chain, settings, consumer, model, upstream, unused, options)
        print(_banner(run, call, ready))
        if options.serve:
            with Signals() as signals:  # SIGINT, SIGTERM or a terminal's SIGHUP
                await signals.wait()
    return 0


@dataclass(frozen=True)
class DevRun:
    """What the banner reports."""

    api: str
    chain: DevChain
    settings: Settings
    consumer: DrainConsumer
    model: str
    upstream: DevUpstream
    unused: list[str]  # settings set in .env or the environment that this run does not use
    options: DevOptions


def _outside_clients(run: DevRun) -> str:
    api, chain, consumer = run.api, run.chain, run.consumer
    command = kit_command(api, chain.rpc_url)
    if command is None:
        return "  (the embedded chain has no JSON-RPC for other programs: `dev --anvil` gives them one)\n"
    key = "0x" + bytes(consumer.account.key).hex()
    return f"""
Pay it from another program (viem, the MCP server, the consumer kit) over the chain's JSON-RPC:
  rpc        {redact(chain.rpc_url or "")}   chain id {chain.chain_id}   token {chain.token}
  export CONSUMER_PRIVATE_KEY={key}   # the demo consumer's key
  {command}
  python -m drain_provider.consumer chat "Hello!"
"""


def _chain_words(run: DevRun) -> tuple[str, str, str]:
    """What the banner says of the chain: what it is, what becomes of it and its channels when
    dev is stopped, and what became of them once `--no-serve` has exited."""
    if run.chain.rpc_url is None:
        return (
            "embedded py-evm chain (in this process)",
            "the embedded chain and its channels end with the process",
            "and the embedded chain and its channels are gone",
        )
    if run.options.anvil_port is not None:
        return (
            f"{run.chain.rpc_url} (anvil, started by dev)",
            "anvil, its chain and its channels end with dev",
            "and anvil, its chain and its channels are gone",
        )
    node = redact(run.chain.rpc_url)
    return (
        f"{node} (the dev node of --rpc-url)",
        f"the node at {node} and its channels go on",
        f"while the node at {node} and its channels go on",
    )


def _upstream_lines(run: DevRun) -> str:
    upstream = run.upstream
    if upstream.origin == "demo":
        line = (
            "  upstream   built-in demo model, in this process: no paid upstream is called\n"
            "             (a real OpenAI-compatible one: --upstream URL [--upstream-key-env NAME] [--model NAME],\n"
            "             or --env to use .env's settings)"
        )
    else:
        line = f"  upstream   {redact(run.settings.upstream_base_url)} ({upstream.origin})"
    if run.unused:
        why = (
            "dev's own chain, key, ledger and loopback address"
            if run.options.read_env
            else "dev is self-contained; --env reads them"
        )
        line += f"\n  not used   {', '.join(run.unused)}\n             (set in .env or the environment: {why})"
    return line


def _snippet(run: DevRun) -> str:
    """The openai SDK snippet, unindented so that its heredoc ends when pasted into bash."""
    return f"""pip install openai   # once: the snippet uses the official SDK, paid through the consumer kit
python - <<'EOF'
from openai import OpenAI
from drain_provider.consumer.transport import drain_http_client
from drain_provider.devtools.dev import load_dev_consumer, save_dev_consumer
consumer = load_dev_consumer("{DEV_FILE}")
client = OpenAI(base_url=consumer.api, api_key="drain", http_client=drain_http_client(consumer))
answer = client.chat.completions.create(model="{run.model}", messages=[{{"role": "user", "content": "Hi!"}}])
save_dev_consumer(consumer, "{DEV_FILE}")
print(answer.choices[0].message.content, "| cost", consumer.last_cost)
EOF
"""


def _banner(run: DevRun, call: dict[str, Any], ready: float) -> str:
    content = call["answer"]["choices"][0]["message"]["content"]
    headers = call["headers"]
    consumer = run.consumer
    contracts = "\n".join(f"  contract   {ref.address} ({ref.version})" for ref in run.settings.contracts)
    chain, fate, gone = _chain_words(run)
    head = f"""
drain-provider dev mode: ready in {ready:.2f} s
  chain      {chain}, chain id {run.chain.chain_id}
{contracts}
  token      {run.chain.token} (test USDC)
  provider   {run.settings.provider_address}
{_upstream_lines(run)}

Demo paid call ({run.model}):
  answer     {content}
  cost       {headers["X-DRAIN-Cost"]} base units (X-DRAIN-Total {headers["X-DRAIN-Total"]}, \
X-DRAIN-Remaining {headers["X-DRAIN-Remaining"]})
  consumer   {consumer.address}  key {"0x" + bytes(consumer.account.key).hex()}
  channel    {consumer.channel_id}  (deposit {consumer.deposit} base units, last nonce {consumer.nonce})
"""
    if not run.options.serve:
        return (
            head
            + f"""
Exited after the demo call (--no-serve): the provider at {run.api} is stopped, {gone}.
Run `python -m drain_provider dev` without --no-serve to keep it serving and call it yourself.
"""
        )
    return (
        head
        + f"""
Call it yourself at {run.api} (facts in {DEV_FILE}):

{_snippet(run)}{_outside_clients(run)}
Press Ctrl-C to stop ({fate}).
"""
    )
