"""`python -m drain_provider.consumer` (or `python -m drain_provider consumer`): pay a DRAIN
provider from the shell.

    export CONSUMER_PRIVATE_KEY=0x...            # or in .env, or --key-file FILE; never printed
    python -m drain_provider.consumer open --provider http://127.0.0.1:3000 --deposit 5
    python -m drain_provider.consumer chat "Hello!"
    python -m drain_provider.consumer status
    python -m drain_provider.consumer close

`open` learns the provider's address, chain and contract from the provider itself (/v1/pricing
and the 402 discovery headers) and the token from the contract's `usdc()`; the channel's state
(id, contract, chain, the last nonce and amount signed) goes to a JSON file (`--state`, default
./drain-channel.json, 0600) that the next command continues from. A lost state file is rebuilt
from the provider's GET /v1/channels/{id} (`--channel ID --provider URL`). The chain is reached
at `--rpc-url`, else RPC_URL (environment or .env), else the chain's public RPC.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import logging
import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from dotenv import dotenv_values
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils.address import to_checksum_address

from ..protocol import DEPLOYMENTS, Domain, close_authorization_digest, format_usdc, recover_signer
from .channel import DrainConsumer
from .discovery import DiscoveryError, api_base, parse_usdc, prices_from_pricing
from .onchain import ConsumerChain, TransactionFailed
from .provider_api import (
    TIMEOUT,
    ProviderError,
    channel_status,
    consumer_request,
    discover,
    get_json,
    request_close,
    stream_chat,
)
from .state import DEFAULT_STATE, ChannelFile, StateError, load_state, new_state

KEY_VARIABLE = "CONSUMER_PRIVATE_KEY"
CHANNEL_ID = re.compile(r"0x[0-9a-fA-F]{64}")
CLOSE_TRIES = 4  # a provider still finishing the channel's requests answers 503 close_pending


class UsageError(Exception):
    """Wrong or missing input: exit code 2. Safe to show."""


def _setting(name: str) -> str | None:
    return os.environ.get(name) or dotenv_values(".env").get(name) or None


def load_key(key_file: str | None) -> LocalAccount:
    """The consumer's key: --key-file, else CONSUMER_PRIVATE_KEY from the environment or .env."""
    if key_file:
        try:
            text: str | None = Path(key_file).read_text().strip()
        except OSError as exc:
            raise UsageError(f"--key-file: cannot read it ({type(exc).__name__})") from None
        source = "--key-file"
    else:
        text, source = _setting(KEY_VARIABLE), KEY_VARIABLE
    if not text:
        raise UsageError(f"no consumer key: set {KEY_VARIABLE} (environment or .env) or pass --key-file FILE")
    try:
        account: LocalAccount = Account.from_key(text)
    except Exception:  # whatever eth-account says, it would quote the value: never shown
        raise UsageError(f"{source} is not a private key (64 hex digits)") from None
    return account


def rpc_url(args: argparse.Namespace, chain_id: int) -> str:
    url = args.rpc_url or _setting("RPC_URL")
    if not url and chain_id in DEPLOYMENTS:
        url = DEPLOYMENTS[chain_id].default_rpc_url
    if not url:
        raise UsageError(f"no RPC URL for chain {chain_id}: pass --rpc-url or set RPC_URL")
    return str(url)


@contextlib.asynccontextmanager
async def connected(
    args: argparse.Namespace, chain_id: int, contract: str, account: LocalAccount
) -> AsyncIterator[ConsumerChain]:
    """The channel's contract over the RPC, checked to be on the provider's chain."""
    chain = ConsumerChain.connect(rpc_url(args, chain_id), contract, account)
    try:
        served = await chain.chain_id()
        if served != chain_id:
            raise UsageError(f"the RPC serves chain {served}, the channel is on chain {chain_id}")
        yield chain
    finally:
        await chain.close()


def _when(timestamp: int) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def say(text: str) -> None:
    print(text, file=sys.stderr)


def sync_from_status(consumer: DrainConsumer, status: dict[str, Any]) -> None:
    """Continue from what the provider holds: its last voucher, charged total and next minimum."""
    try:
        last = status.get("lastVoucher") or {}
        consumer.nonce = max(consumer.nonce, int(last.get("nonce", 0)))
        consumer.amount = max(consumer.amount, int(last.get("amount", 0)))
        consumer.charged = max(consumer.charged, int(status.get("charged", 0)))
        consumer.next_min = max(consumer.next_min, int((status.get("next") or {}).get("minAmount", 0)))
    except (ValueError, TypeError, AttributeError):
        raise ProviderError("the channel status has figures that are not integers") from None


async def recover(
    session: aiohttp.ClientSession, api: str, channel_id: str, account: LocalAccount, path: Path
) -> ChannelFile:
    """A channel state rebuilt from the provider's GET /v1/channels/{id}."""
    if not CHANNEL_ID.fullmatch(channel_id):
        raise UsageError("--channel must be 0x and 64 hex digits")
    status = await channel_status(session, api, channel_id)
    try:
        if str(status["consumer"]).lower() != str(account.address).lower():
            raise StateError(f"the channel's consumer is {status['consumer']}, not this key's address")
        consumer = DrainConsumer(
            account=account,
            domain=Domain(int(status["chainId"]), to_checksum_address(status["contract"])),
            channel_id=channel_id.lower(),
            deposit=int(status["deposit"]),
            api=api,
            expiry=int(status["expiry"]),
        )
        provider = to_checksum_address(status["provider"])
    except (KeyError, ValueError, TypeError):
        raise ProviderError("the channel status is not complete") from None
    sync_from_status(consumer, status)
    say(f"recovered the channel's state from the provider (GET /v1/channels/{channel_id[:10]}…) into {path}")
    return new_state(path, consumer, provider=provider, status=str(status.get("status", "open")))


async def channel_of(
    args: argparse.Namespace, session: aiohttp.ClientSession, account: LocalAccount
) -> tuple[ChannelFile, DrainConsumer]:
    state = load_state(args.state)
    if state is None:
        if not (args.channel and args.provider):
            raise UsageError(
                f"no channel state in {args.state}: run `open` first, "
                "or pass --channel ID --provider URL to continue one"
            )
        state = await recover(session, api_base(args.provider), args.channel, account, args.state)
    elif args.channel and args.channel.lower() != str(state.facts["channelId"]).lower():
        raise UsageError(f"{args.state} is about channel {state.facts['channelId']}; use --state for another file")
    return state, state.consumer(account)


async def cmd_open(args: argparse.Namespace, session: aiohttp.ClientSession, account: LocalAccount) -> int:
    existing = load_state(args.state)
    if existing is not None and not existing.closed:
        raise UsageError(
            f"{args.state} holds the open channel {existing.facts['channelId']}: close it first, "
            "or use --state for another file"
        )
    api = api_base(args.provider)
    deposit = parse_usdc(args.deposit)
    if deposit <= 0:
        raise UsageError("--deposit must be above 0")
    facts = await discover(session, api)
    if args.duration < facts.min_duration:
        raise UsageError(f"--duration: the provider refuses vouchers on channels shorter than {facts.min_duration} s")
    contract = to_checksum_address(args.contract or facts.contract)
    async with connected(args, facts.chain_id, contract, account) as chain:
        say(f"approving and opening: {format_usdc(deposit)} USDC to {facts.provider} on {contract} …")
        opened = await chain.open(facts.provider, deposit, args.duration)
    consumer = DrainConsumer(
        account=account,
        domain=Domain(facts.chain_id, contract),
        channel_id=opened.channel_id,
        deposit=opened.deposit,
        api=api,
        expiry=opened.expiry,
    )
    new_state(args.state, consumer, provider=facts.provider)
    say(f"opened; expires {_when(opened.expiry)}; state in {args.state}")
    print(opened.channel_id)
    return 0


async def cmd_status(args: argparse.Namespace, session: aiohttp.ClientSession, account: LocalAccount) -> int:
    state, consumer = await channel_of(args, session, account)
    report: dict[str, Any] = {"channelId": consumer.channel_id, "state": str(args.state)}
    try:
        seen = await channel_status(session, str(consumer.api), consumer.channel_id)
        sync_from_status(consumer, seen)
        report["provider"] = seen
    except (ProviderError, aiohttp.ClientError) as exc:
        report["provider"] = {"error": str(exc) if isinstance(exc, ProviderError) else type(exc).__name__}
    try:
        async with connected(args, consumer.domain.chain_id, consumer.domain.verifying_contract, account) as chain:
            on_chain = await chain.channel(consumer.channel_id)
            now = int((await chain.w3.eth.get_block("latest"))["timestamp"])
        report["chain"] = {
            "open": on_chain.exists,
            "deposit": str(on_chain.deposit),
            "claimed": str(on_chain.claimed),
            "expiry": on_chain.expiry,
            "expired": on_chain.exists and now >= on_chain.expiry,
        }
    except UsageError as exc:
        report["chain"] = {"error": str(exc)}
    except Exception as exc:  # an RPC that does not answer: its error may quote its URL
        report["chain"] = {"error": f"the chain RPC did not answer ({type(exc).__name__})"}
    state.update(consumer)
    report["local"] = {key: state.facts.get(key) for key in ("status", "lastNonce", "lastAmount", "charged")}
    print(json.dumps(report, indent=2))
    return 0


def _printer(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


async def cmd_chat(args: argparse.Namespace, session: aiohttp.ClientSession, account: LocalAccount) -> int:
    state, consumer = await channel_of(args, session, account)
    if state.closed:
        raise UsageError(f"the channel in {args.state} is closed: `open` a new one")
    prices = prices_from_pricing(await get_json(session, f"{consumer.api}/pricing"))
    model = args.model or (next(iter(prices)) if len(prices) == 1 else None)
    if model not in prices:
        raise UsageError(f"--model: one of {', '.join(sorted(prices))}")
    body = {
        "model": model,
        "messages": [{"role": "user", "content": " ".join(args.message)}],
        "max_tokens": args.max_tokens,
        "stream": True,
    }
    for attempt in range(2):
        voucher = consumer.voucher_for(body, prices[model])
        state.update(consumer)  # before sending: a nonce is never signed twice
        try:
            result = await stream_chat(session, str(consumer.api), body, voucher.header_value(), _printer)
            break
        except ProviderError as exc:
            if attempt or exc.code not in ("invalid_nonce", "invalid_amount"):
                raise
            # This state is behind the provider (an older copy, another client): continue from it.
            sync_from_status(consumer, await channel_status(session, str(consumer.api), consumer.channel_id))
    print()
    consumer.record(result.figures)
    state.update(consumer)
    if result.error:
        say(f"the stream ended with an error: {result.error}")
    figures = result.figures
    if "X-DRAIN-Cost" not in figures:
        say("the stream carried no cost figures")
        return 1
    print(
        f"cost {figures['X-DRAIN-Cost']} total {figures.get('X-DRAIN-Total')} "
        f"remaining {figures.get('X-DRAIN-Remaining')} (base units)"
    )
    return 0 if result.error is None else 1


async def _authorization(
    session: aiohttp.ClientSession, consumer: DrainConsumer, provider: str, expiry: int
) -> tuple[int, bytes]:
    """The provider's CloseAuthorization, checked to be its own signature."""
    signed = consumer_request(bytes(consumer.account.key), consumer.domain, consumer.channel_id, "close")
    for attempt in range(CLOSE_TRIES):
        try:
            answer = await request_close(session, str(consumer.api), consumer.channel_id, signed)
            break
        except ProviderError as exc:
            if exc.code == "close_not_supported":
                raise ProviderError(f"{exc}; a V1 channel closes after its expiry, {_when(expiry)}") from None
            if exc.code != "close_pending" or attempt == CLOSE_TRIES - 1:
                raise
            say("the provider is finishing the channel's requests; asking again …")
            await asyncio.sleep(min(exc.retry_after or 5, 10))
    try:
        final_amount = int(answer["finalAmount"])
        signature = bytes.fromhex(str(answer["signature"]).removeprefix("0x"))
    except (KeyError, ValueError):
        raise ProviderError("the close authorization is malformed") from None
    digest = close_authorization_digest(consumer.domain.separator, consumer.channel_id, final_amount)
    if str(recover_signer(digest, signature)).lower() != provider.lower():
        raise ProviderError("the close authorization is not signed by the channel's provider")
    return final_amount, signature


async def cmd_close(args: argparse.Namespace, session: aiohttp.ClientSession, account: LocalAccount) -> int:
    state, consumer = await channel_of(args, session, account)
    if state.closed and "refund" in state.facts:
        print(f"refund {state.facts['refund']} (base units; closed already)")
        return 0
    async with connected(args, consumer.domain.chain_id, consumer.domain.verifying_contract, account) as chain:
        on_chain = await chain.channel(consumer.channel_id)
        if not on_chain.exists:
            state.update(consumer, status="closed")
            say("the channel is closed on chain already")
            return 0
        now = int((await chain.w3.eth.get_block("latest"))["timestamp"])
        if now >= on_chain.expiry:
            refund = await chain.close_expired(consumer.channel_id)
        else:
            final_amount, signature = await _authorization(session, consumer, on_chain.provider, on_chain.expiry)
            say(f"the provider signed a final amount of {final_amount}; calling cooperativeClose …")
            refund = await chain.cooperative_close(consumer.channel_id, final_amount, signature)
    state.update(consumer, status="closed", refund=str(refund))
    print(f"refund {refund} (base units, {format_usdc(refund)} USDC) to {consumer.address}")
    return 0


COMMANDS = {"open": cmd_open, "status": cmd_status, "chat": cmd_chat, "close": cmd_close}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m drain_provider.consumer",
        description="A DRAIN consumer: open a channel, chat, read its status, close it.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--state",
        type=Path,
        default=Path(os.environ.get("DRAIN_STATE") or DEFAULT_STATE),
        help="the channel state file (default: $DRAIN_STATE or ./drain-channel.json)",
    )
    common.add_argument("--key-file", help=f"a file holding the consumer's private key (default: ${KEY_VARIABLE})")
    common.add_argument("--rpc-url", help="the chain's JSON-RPC (default: $RPC_URL, else the chain's public RPC)")
    common.add_argument("-v", "--verbose", action="store_true", help="log the transactions sent")
    resume = argparse.ArgumentParser(add_help=False)
    resume.add_argument("--channel", help="without a state file: the channel to continue (0x + 64 hex)")
    resume.add_argument("--provider", help="without a state file: the provider's URL")
    commands = parser.add_subparsers(dest="command", required=True)
    opener = commands.add_parser("open", parents=[common], help="approve + open a channel; prints its id")
    opener.add_argument("--provider", required=True, help="the provider's URL, such as http://127.0.0.1:3000")
    opener.add_argument("--deposit", required=True, help="USDC to lock, such as 5 or 0.25")
    opener.add_argument("--duration", type=int, default=86_400, help="seconds the channel lasts (default: a day)")
    opener.add_argument("--contract", help="a DrainChannel contract of the provider's other than the one it announces")
    commands.add_parser("status", parents=[common, resume], help="the provider's and the chain's view, as JSON")
    chat = commands.add_parser("chat", parents=[common, resume], help="a paid streamed chat; prints the text and cost")
    chat.add_argument("message", nargs="+")
    chat.add_argument("--model", help="default: the provider's only model")
    chat.add_argument("--max-tokens", type=int, default=256)
    commands.add_parser("close", parents=[common, resume], help="cooperative close (or close after expiry); the refund")
    return parser


async def run(args: argparse.Namespace) -> int:
    account = load_key(args.key_file)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        return await COMMANDS[args.command](args, session, account)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Quiet unless asked: what goes wrong is said in one line by main; the logs are for -v.
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR, format="%(message)s")
    try:
        return asyncio.run(run(args))
    except (UsageError, StateError, DiscoveryError) as exc:
        say(f"drain consumer: {exc}")
        return 2
    except (ProviderError, TransactionFailed) as exc:
        say(f"drain consumer: {exc}")
        return 1
    except aiohttp.ClientError as exc:
        say(f"drain consumer: the provider did not answer ({type(exc).__name__})")
        return 1
    except KeyboardInterrupt:
        return 130
