"""Every error code a client can cause, each triggered by a real request, and none of them
changing the ledger."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import openai
import pytest
from eth_account import Account
from helpers import ChannelFactory, Provider, ProviderFactory, paid_chat
from openai.types.chat import ChatCompletionMessageParam

from drain_provider.api.errors import ERRORS
from drain_provider.chain import ChainClient
from drain_provider.consumer import DrainConsumer
from drain_provider.devtools.devchain import DevChain
from drain_provider.protocol import SECP256K1_N, Domain, Voucher, sign_voucher

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]

# The DRAIN reference provider's codes and statuses: clients written against it must see the same.
REFERENCE_CODES = {
    "voucher_required": 402,
    "invalid_voucher_format": 402,
    "insufficient_funds": 402,
    "invalid_signature": 402,
    "channel_not_found": 402,
    "wrong_provider": 402,
    "model_not_supported": 400,
}


def test_reference_error_codes_have_reference_statuses() -> None:
    assert {code: ERRORS[code].status for code in REFERENCE_CODES} == REFERENCE_CODES


@pytest.mark.parametrize("code", ERRORS)
def test_every_error_code_is_a_client_or_server_error(code: str) -> None:
    spec = ERRORS[code]
    assert 400 <= spec.status <= 599
    assert spec.type and spec.message
    assert "\n" not in spec.message  # messages may be written into headers


async def sdk_error(provider: Provider, header: str | None, **kwargs: Any) -> openai.APIStatusError:
    """Send a chat completion with this X-DRAIN-Voucher header; return the error it must cause."""
    extra = {"X-DRAIN-Voucher": header} if header is not None else {}
    body = {"model": "demo", "messages": MESSAGES, **kwargs}
    with pytest.raises(openai.APIStatusError) as info:
        await provider.client().chat.completions.create(**body, extra_headers=extra)
    return info.value


def assert_error(error: openai.APIStatusError, status: int, code: str) -> dict[str, Any]:
    assert error.status_code == status, error.body
    assert error.response.headers["X-DRAIN-Error"] == code
    body: dict[str, Any] = error.response.json()
    assert body["error"]["code"] == code
    assert body["error"]["message"] and body["error"]["type"]
    return body


async def ledger_state(provider: Provider) -> tuple[Any, ...]:
    """Every balance a refused request must leave untouched (a channel seen for the first time
    may be cached, with nothing accepted or charged on it)."""
    channels = await provider.ledger.fetchall(
        """SELECT channel_id, charged, reserved, last_amount, last_nonce FROM channels
           WHERE charged != 0 OR reserved != 0 OR last_nonce != '0' ORDER BY channel_id"""
    )
    vouchers = await provider.ledger.fetchone("SELECT COUNT(*) FROM vouchers")
    usage = await provider.ledger.fetchone("SELECT COUNT(*), COALESCE(SUM(cost), 0) FROM usage")
    return (tuple(channels), vouchers, usage)


@pytest.fixture
async def paying(provider: Provider, open_channel: ChannelFactory) -> DrainConsumer:
    """A consumer whose channel has one paid call behind it (nonce 1)."""
    consumer = await open_channel(provider)
    await paid_chat(provider.client(), consumer)
    return consumer


async def test_voucher_required_with_discovery_headers(provider: Provider) -> None:
    error = await sdk_error(provider, None)
    assert_error(error, 402, "voucher_required")
    headers = error.response.headers
    assert headers["X-Payment-Protocol"] == "drain-v2"
    assert headers["X-Payment-Provider"] == provider.address
    assert headers["X-Payment-Contract"] == provider.settings.drain_contract
    assert headers["X-Payment-Chain"] == str(provider.settings.chain_id)
    assert headers["X-Payment-Signing"].endswith("/v1/signing")
    assert headers["X-Payment-Docs"].endswith("/v1/docs")
    async with aiohttp.ClientSession() as session, session.get(headers["X-Payment-Signing"]) as resp:
        signing = await resp.json()
    assert signing["domain"]["verifyingContract"] == provider.settings.drain_contract
    assert signing["domain"]["chainId"] == provider.settings.chain_id


def _good(consumer: DrainConsumer) -> dict[str, Any]:
    voucher = sign_voucher(consumer.account.key, consumer.domain, consumer.channel_id, 100_000, consumer.nonce + 1)
    return voucher.to_json()


MALFORMED: list[tuple[str, Any]] = [
    ("not json", lambda v: "channelId=0x12"),
    ("array", lambda v: json.dumps([v])),
    ("string", lambda v: json.dumps("voucher")),
    ("missing field", lambda v: json.dumps({k: x for k, x in v.items() if k != "nonce"})),
    ("extra field", lambda v: json.dumps({**v, "extra": "1"})),
    ("short channel id", lambda v: json.dumps({**v, "channelId": v["channelId"][:-2]})),
    ("channel id without 0x", lambda v: json.dumps({**v, "channelId": v["channelId"][2:] + "00"})),
    ("channel id not hex", lambda v: json.dumps({**v, "channelId": "0x" + "zz" * 32})),
    ("float amount", lambda v: json.dumps({**v, "amount": 1.5})),
    ("float string", lambda v: json.dumps({**v, "amount": "1.5"})),
    ("exponent", lambda v: json.dumps({**v, "amount": "1e6"})),
    ("negative", lambda v: json.dumps({**v, "amount": "-1"})),
    ("negative int", lambda v: json.dumps({**v, "nonce": -1})),
    ("bool amount", lambda v: json.dumps({**v, "amount": True})),
    ("null nonce", lambda v: json.dumps({**v, "nonce": None})),
    ("leading zeros", lambda v: json.dumps({**v, "amount": "0100"})),
    ("above uint256", lambda v: json.dumps({**v, "amount": str(2**256)})),
    ("huge json int", lambda v: json.dumps({**v, "nonce": 2**300})),
    ("short signature", lambda v: json.dumps({**v, "signature": v["signature"][:-2]})),
    ("long signature", lambda v: json.dumps({**v, "signature": v["signature"] + "00"})),
    ("signature not hex", lambda v: json.dumps({**v, "signature": "0x" + "g" * 130})),
    ("overlong header", lambda v: json.dumps({**v, "pad": "x" * 5000})),
    ("nested", lambda v: "[" * 5000),
    ("duplicate field", lambda v: json.dumps(v)[:-1] + ', "amount": "1"}'),
]


@pytest.mark.parametrize(("case", "make"), MALFORMED, ids=[c for c, _ in MALFORMED])
@pytest.mark.rule(1)
async def test_invalid_voucher_format(provider: Provider, paying: DrainConsumer, case: str, make: Any) -> None:
    before = await ledger_state(provider)
    error = await sdk_error(provider, make(_good(paying)))
    assert_error(error, 402, "invalid_voucher_format")
    assert await ledger_state(provider) == before


async def test_json_integers_are_accepted(provider: Provider, paying: DrainConsumer) -> None:
    voucher = _good(paying)
    header = json.dumps({**voucher, "amount": int(voucher["amount"]), "nonce": int(voucher["nonce"])})
    raw = await provider.client().chat.completions.with_raw_response.create(
        model="demo", messages=MESSAGES, extra_headers={"X-DRAIN-Voucher": header}
    )
    assert int(raw.headers["X-DRAIN-Cost"]) > 0


def _with_signature(voucher: Voucher, signature: bytes) -> str:
    return Voucher(voucher.channel_id, voucher.amount, voucher.nonce, signature).header_value()


@pytest.mark.rule(1)
async def test_invalid_signatures(provider: Provider, paying: DrainConsumer, chain: DevChain) -> None:
    before = await ledger_state(provider)
    nonce = paying.nonce + 1
    stranger = sign_voucher(bytes(Account.create().key), paying.domain, paying.channel_id, 100_000, nonce)
    other_chain = Domain(paying.domain.chain_id + 1, paying.domain.verifying_contract)
    wrong_chain = sign_voucher(paying.account.key, other_chain, paying.channel_id, 100_000, nonce)
    other_contract = Domain(paying.domain.chain_id, chain.token)
    wrong_contract = sign_voucher(paying.account.key, other_contract, paying.channel_id, 100_000, nonce)
    good = sign_voucher(paying.account.key, paying.domain, paying.channel_id, 100_000, nonce)
    r, s, v = good.signature[:32], int.from_bytes(good.signature[32:64], "big"), good.signature[64]
    high_s = r + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - v])  # same signer, malleated
    v_low = good.signature[:64] + bytes([v - 25])  # 2 or 3: + 27 is 29 or 30, invalid
    v_high = good.signature[:64] + bytes([v + 2])
    wrong_amount = Voucher(good.channel_id, good.amount + 1, good.nonce, good.signature)
    for header in (
        stranger.header_value(),
        wrong_chain.header_value(),
        wrong_contract.header_value(),
        _with_signature(good, high_s),
        _with_signature(good, v_low),
        _with_signature(good, v_high),
        _with_signature(good, bytes(65)),
        wrong_amount.header_value(),
    ):
        assert_error(await sdk_error(provider, header), 402, "invalid_signature")
    assert await ledger_state(provider) == before


@pytest.mark.rule(1)
async def test_channel_not_found(provider: Provider) -> None:
    voucher = sign_voucher(bytes(Account.create().key), provider.domain, "0x" + "ab" * 32, 1000, 1)
    assert_error(await sdk_error(provider, voucher.header_value()), 402, "channel_not_found")
    assert await provider.ledger.fetchone("SELECT COUNT(*) FROM channels") == (0,)


@pytest.mark.rule(1)
async def test_wrong_provider(provider: Provider, open_channel: ChannelFactory) -> None:
    elsewhere = await open_channel(Account.create().address)
    voucher = elsewhere.next_voucher(100_000)
    body = assert_error(await sdk_error(provider, voucher.header_value()), 402, "wrong_provider")
    assert provider.address in body["error"]["message"]


@pytest.mark.rule(1)
async def test_replayed_and_lower_nonce(provider: Provider, paying: DrainConsumer) -> None:
    replay = paying.sign(paying.amount, nonce=paying.nonce)  # the nonce already used
    before = await ledger_state(provider)
    assert_error(await sdk_error(provider, replay.header_value()), 402, "invalid_nonce")
    lower = paying.sign(paying.amount + 10_000, nonce=0)
    assert_error(await sdk_error(provider, lower.header_value()), 402, "invalid_nonce")
    assert await ledger_state(provider) == before


@pytest.mark.rule(1)
async def test_amount_below_last(provider: Provider, paying: DrainConsumer) -> None:
    lower = sign_voucher(paying.account.key, paying.domain, paying.channel_id, paying.amount - 1, paying.nonce + 1)
    assert_error(await sdk_error(provider, lower.header_value()), 402, "invalid_amount")


@pytest.mark.rule(1)
async def test_amount_over_deposit(provider: Provider, paying: DrainConsumer) -> None:
    over = sign_voucher(paying.account.key, paying.domain, paying.channel_id, paying.deposit + 1, paying.nonce + 1)
    assert_error(await sdk_error(provider, over.header_value()), 402, "exceeds_deposit")


@pytest.mark.rule(2)
async def test_insufficient_funds_reports_required_and_provided(
    provider: Provider, open_channel: ChannelFactory
) -> None:
    paying = await open_channel(provider)
    before = await ledger_state(provider)
    voucher = paying.sign(3)  # three base units: less than the input alone costs
    error = await sdk_error(provider, voucher.header_value(), max_tokens=100)
    assert_error(error, 402, "insufficient_funds")
    required = int(error.response.headers["X-DRAIN-Required"])
    assert int(error.response.headers["X-DRAIN-Provided"]) == voucher.amount
    assert required > voucher.amount
    assert await ledger_state(provider) == before
    # Signing exactly what was asked for is enough.
    enough = paying.sign(required)
    raw = await provider.client().chat.completions.with_raw_response.create(
        model="demo", messages=MESSAGES, max_tokens=100, extra_headers={"X-DRAIN-Voucher": enough.header_value()}
    )
    assert raw.parse().choices[0].message.content


async def test_closed_channel_is_refused(provider: Provider, open_channel: ChannelFactory, chain: DevChain) -> None:
    consumer = await open_channel(provider, duration=60)
    await chain.travel(seconds=120)
    client = chain.client()
    closed = await client.send(
        consumer.account, client.contract.functions.close(bytes.fromhex(consumer.channel_id[2:]))
    )
    assert closed.succeeded
    assert not (await client.get_channel(consumer.channel_id)).exists
    voucher = consumer.next_voucher(100_000)
    assert_error(await sdk_error(provider, voucher.header_value()), 402, "channel_not_found")
    assert await provider.ledger.fetchone("SELECT COUNT(*) FROM vouchers") == (0,)


async def test_unknown_model(provider: Provider, paying: DrainConsumer) -> None:
    error = await sdk_error(provider, paying.next_voucher(1000).header_value(), model="gpt-99")
    assert_error(error, 400, "model_not_supported")


BAD_BODIES: list[tuple[str, bytes]] = [
    ("not json", b"{not json"),
    ("array", b"[]"),
    ("no model", json.dumps({"messages": MESSAGES}).encode()),
    ("model not string", json.dumps({"model": 5, "messages": MESSAGES}).encode()),
    ("no messages", json.dumps({"model": "demo"}).encode()),
    ("empty messages", json.dumps({"model": "demo", "messages": []}).encode()),
    ("message not object", json.dumps({"model": "demo", "messages": ["hi"]}).encode()),
    ("max_tokens string", json.dumps({"model": "demo", "messages": MESSAGES, "max_tokens": "10"}).encode()),
    ("max_tokens bool", json.dumps({"model": "demo", "messages": MESSAGES, "max_tokens": True}).encode()),
    ("max_tokens zero", json.dumps({"model": "demo", "messages": MESSAGES, "max_tokens": 0}).encode()),
    ("max_tokens huge", json.dumps({"model": "demo", "messages": MESSAGES, "max_tokens": 10**30}).encode()),
    ("n zero", json.dumps({"model": "demo", "messages": MESSAGES, "n": 0}).encode()),
    ("stream not bool", json.dumps({"model": "demo", "messages": MESSAGES, "stream": "yes"}).encode()),
    ("invalid utf-8", b'{"model": "demo", "messages": "\xff"}'),
    ("deep nesting", b"[" * 100_000),
    ("NaN", b'{"model": "demo", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'),
    ("infinite number", b'{"model": "demo", "messages": [{"role": "user", "content": "hi"}], "temperature": 1e400}'),
]


@pytest.mark.parametrize(("case", "body"), BAD_BODIES, ids=[c for c, _ in BAD_BODIES])
async def test_invalid_request_bodies(provider: Provider, paying: DrainConsumer, case: str, body: bytes) -> None:
    before = await ledger_state(provider)
    headers = {"X-DRAIN-Voucher": paying.next_voucher(1000).header_value(), "Content-Type": "application/json"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{provider.url}/chat/completions", data=body, headers=headers) as resp,
    ):
        assert resp.status == 400
        assert resp.headers["X-DRAIN-Error"] == "invalid_request"
        assert (await resp.json())["error"]["code"] == "invalid_request"
    assert await ledger_state(provider) == before


async def test_oversized_body_is_413(provider: Provider, paying: DrainConsumer) -> None:
    before = await ledger_state(provider)
    content = "x" * (provider.settings.max_body_bytes + 1)
    error = await sdk_error(
        provider, paying.next_voucher(1000).header_value(), messages=[{"role": "user", "content": content}]
    )
    assert_error(error, 413, "request_too_large")
    assert await ledger_state(provider) == before


async def test_unknown_route_and_method(provider: Provider) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{provider.url}/nope") as resp:
            assert resp.status == 404 and resp.headers["X-DRAIN-Error"] == "not_found"
        async with session.get(f"{provider.url}/chat/completions") as resp:
            assert resp.status == 405 and resp.headers["X-DRAIN-Error"] == "method_not_allowed"


async def test_chain_unavailable_is_503_not_402(
    provider_factory: ProviderFactory, open_channel: ChannelFactory
) -> None:
    dead = ChainClient.over_http("http://127.0.0.1:9", "0x" + "11" * 20, timeout=1)
    provider = await provider_factory(chain_client=dead)
    consumer = await open_channel(provider)
    error = await sdk_error(provider, consumer.next_voucher(1000).header_value())
    assert_error(error, 503, "chain_unavailable")
    assert await provider.ledger.fetchone("SELECT COUNT(*) FROM vouchers") == (0,)
