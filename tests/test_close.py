"""Cooperative close (POST /v1/close-channel) end to end: the MCP server's exact request, the
consumer's cooperativeClose on chain with the answer, what each party gets with V2's fee, and the
rules around it: vouchers refused once a close is asked for, requests in flight waited for, the
final amount never below what the chain holds, the consumer's optional signature, the claimer
holding back."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from eth_account import Account
from helpers import (
    ENGINES,
    FEE_BPS,
    USDC,
    ChannelFactory,
    Provider,
    ProviderFactory,
    RpcProxy,
    call,
    consumer_request,
    paid_chat,
    refused_chat,
)

from drain_provider.api.state import CLOSER
from drain_provider.chain import ChainClient, TxResult
from drain_provider.consumer import DrainConsumer
from drain_provider.devtools.devchain import DevChain
from drain_provider.protocol import Voucher, close_authorization_digest, recover_signer
from drain_provider.states import ChannelStatus, ClaimStatus

# Money and claims hold alike on both ledger engines.
pytestmark = pytest.mark.parametrize("engine", ENGINES, indirect=True)


async def close(provider: Provider, body: Any) -> tuple[int, Any]:
    """POST /v1/close-channel as the MCP server sends it: fetch(..., JSON.stringify(body))."""
    status, answer, _ = await call(provider, "POST", "/close-channel", data=json.dumps(body).encode())
    return status, answer


async def cooperative_close(chain: DevChain, consumer: DrainConsumer, answer: dict[str, Any]) -> TxResult:
    """What the MCP server does with the answer: cooperativeClose(channelId, finalAmount, signature)."""
    client = chain.client()
    call_ = client.contract.functions.cooperativeClose(
        bytes.fromhex(consumer.channel_id[2:]), int(answer["finalAmount"]), bytes.fromhex(answer["signature"][2:])
    )
    return await client.send(consumer.account, call_)


async def record_of(provider: Provider, consumer: DrainConsumer) -> Any:
    record = await provider.ledger.get_channel(consumer.channel_id)
    assert record is not None
    return record


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def closed(provider: Provider, consumer: DrainConsumer) -> bool:
    record = await provider.ledger.get_channel(consumer.channel_id)
    return record is not None and record.status is ChannelStatus.CLOSED


async def reserved(provider: Provider, consumer: DrainConsumer) -> bool:
    record = await provider.ledger.get_channel(consumer.channel_id)
    return record is not None and record.reserved > 0


@pytest.mark.rule(10)
async def test_the_mcp_request_then_cooperative_close_pays_each_party_and_is_booked(
    provider_factory: ProviderFactory, open_channel: ChannelFactory, fee_chain: DevChain
) -> None:
    provider = await provider_factory(on=fee_chain, chain_poll_interval=0.05)
    consumer = await open_channel(provider, on=fee_chain, deposit=2 * USDC)
    client = provider.client()
    for _ in range(2):
        await paid_chat(client, consumer, budget=300)
    (claim,) = await provider.claimer.cycle(force=True)
    assert claim.status == ClaimStatus.CONFIRMED
    for _ in range(3):
        await paid_chat(client, consumer, budget=300)
    before = await record_of(provider, consumer)
    assert 0 < before.claimed < before.charged  # a payout is left for the close
    balances = [await fee_chain.usdc_balance(a) for a in (consumer.address, provider.address, fee_chain.funder)]

    status, answer = await close(provider, {"channelId": consumer.channel_id})
    assert status == 200, answer
    assert answer == {
        "channelId": consumer.channel_id,
        "finalAmount": str(before.charged),
        "signature": answer["signature"],
        "contract": fee_chain.contract,
        "chainId": fee_chain.chain_id,
    }
    digest = close_authorization_digest(provider.domain.separator, consumer.channel_id, before.charged)
    assert recover_signer(digest, bytes.fromhex(answer["signature"][2:])) == provider.address
    assert int(answer["signature"][-2:], 16) in (27, 28)
    assert await close(provider, {"channelId": consumer.channel_id}) == (200, answer)  # the same, stored

    result = await cooperative_close(fee_chain, consumer, answer)
    assert result.succeeded
    final, claimed = before.charged, before.claimed
    fee = (final - claimed) * FEE_BPS // 10_000
    after = [await fee_chain.usdc_balance(a) for a in (consumer.address, provider.address, fee_chain.funder)]
    assert after[0] - balances[0] == consumer.deposit - final  # the refund
    assert after[1] - balances[1] == final - claimed - fee  # the payout, less the fee
    assert after[2] - balances[2] == fee

    await eventually(lambda: closed(provider, consumer))  # the chain watcher books it
    booked = await record_of(provider, consumer)
    assert (booked.close_kind, booked.claimed, booked.lost) == ("cooperative", final, 0)
    assert await close(provider, {"channelId": consumer.channel_id}) == (200, answer)  # still the same


@pytest.mark.rule(10)
async def test_a_voucher_after_the_close_request_is_refused_and_changes_nothing(
    provider: Provider, open_channel: ChannelFactory
) -> None:
    consumer = await open_channel(provider)
    client = provider.client()
    await paid_chat(client, consumer)
    assert (await close(provider, {"channelId": consumer.channel_id}))[0] == 200
    before = await record_of(provider, consumer)
    assert before.status is ChannelStatus.CLOSING
    error = await refused_chat(client, consumer)
    assert (error.status_code, error.response.headers["X-DRAIN-Error"]) == (402, "channel_closing")
    assert await record_of(provider, consumer) == before
    assert await provider.ledger.fetchone("SELECT COUNT(*) FROM vouchers WHERE channel_id = ?", (consumer.channel_id,))
    assert (await provider.ledger.fetchone("SELECT COUNT(*) FROM usage"))[0] == 1  # type: ignore[index]


@pytest.mark.rule(10)
async def test_the_ledger_refuses_a_closing_channel_the_gate_still_knows(
    provider: Provider, open_channel: ChannelFactory
) -> None:
    """A request that passed the gate's memory while the close was being asked for: the
    authorize transaction is the check that counts."""
    consumer = await open_channel(provider)
    client = provider.client()
    await paid_chat(client, consumer)  # the gate knows the channel now
    await provider.ledger.begin_close(consumer.channel_id)  # not through the route: the gate is not told
    before = await record_of(provider, consumer)
    error = await refused_chat(client, consumer)
    assert error.response.headers["X-DRAIN-Error"] == "channel_closing"
    assert await record_of(provider, consumer) == before


@pytest.mark.rule(10)
async def test_the_close_waits_for_a_stream_in_flight_and_includes_its_cost(
    provider: Provider, open_channel: ChannelFactory
) -> None:
    consumer = await open_channel(provider)
    client = provider.client()
    await paid_chat(client, consumer)
    charged_before = consumer.charged
    voucher = consumer.next_voucher(5_000)
    stream = await client.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": '!demo {"token_delay": 0.01}'}],
        stream=True,
        extra_headers={"X-DRAIN-Voucher": voucher.header_value()},
    )

    async def read() -> None:
        async for _ in stream:
            pass

    reading = asyncio.create_task(read())
    assert (await record_of(provider, consumer)).reserved > 0  # its headers came: it is reserved
    status, answer = await close(provider, {"channelId": consumer.channel_id})
    assert status == 200
    await reading
    record = await record_of(provider, consumer)
    assert record.reserved == 0 and record.charged > charged_before
    assert int(answer["finalAmount"]) == record.charged  # the stream's cost is settled only at its end


@pytest.mark.rule(10)
async def test_a_request_outlasting_the_wait_is_close_pending_and_a_repeat_finishes(
    provider: Provider, open_channel: ChannelFactory
) -> None:
    consumer = await open_channel(provider)
    provider.app[CLOSER].wait = 0.2
    slow = asyncio.create_task(paid_chat(provider.client(), consumer, content='!demo {"delay": 0.6}'))
    await eventually(lambda: reserved(provider, consumer))
    status, pending, headers = await call(
        provider, "POST", "/close-channel", data=json.dumps({"channelId": consumer.channel_id}).encode()
    )
    assert (status, pending["error"]["code"], headers["Retry-After"]) == (503, "close_pending", "5")
    assert (await record_of(provider, consumer)).status is ChannelStatus.CLOSING
    raw = await slow  # served: it was accepted before the close
    cost = int(raw.headers["X-DRAIN-Cost"])
    assert cost > 0
    status, answer = await close(provider, {"channelId": consumer.channel_id})
    assert (status, answer["finalAmount"]) == (200, str(cost))


@pytest.mark.rule(10)
async def test_the_final_amount_is_what_the_chain_holds_when_a_claim_took_more(
    provider: Provider, open_channel: ChannelFactory, chain: DevChain
) -> None:
    consumer = await open_channel(provider)
    await paid_chat(provider.client(), consumer, budget=50_000)  # signs well ahead
    # The voucher is claimed on chain behind the ledger's back (another process, a lost receipt).
    row = await provider.ledger.fetchone(
        "SELECT amount, nonce, signature FROM vouchers WHERE channel_id = ?", (consumer.channel_id,)
    )
    assert row is not None
    stored = Voucher(consumer.channel_id, row[0], int(row[1]), bytes.fromhex(row[2][2:]))
    account = Account.from_key(provider.settings.provider_private_key)
    assert (await chain.client().claim(account, stored)).succeeded
    record = await record_of(provider, consumer)
    assert record.claimed == 0 < record.charged < stored.amount
    status, answer = await close(provider, {"channelId": consumer.channel_id})
    assert (status, answer["finalAmount"]) == (200, str(stored.amount))  # the chain's, read now
    refund = await chain.usdc_balance(consumer.address)
    assert (await cooperative_close(chain, consumer, answer)).succeeded  # below it, it would revert
    assert await chain.usdc_balance(consumer.address) - refund == consumer.deposit - stored.amount


@pytest.mark.rule(10)
async def test_a_claim_in_flight_raises_the_final_amount(provider: Provider, open_channel: ChannelFactory) -> None:
    consumer = await open_channel(provider)
    await paid_chat(provider.client(), consumer, budget=50_000)
    (target,) = await provider.ledger.claim_targets(
        provider=provider.address, threshold=0, final_after=0, now=time.time(), force=True
    )
    claim_id = await provider.ledger.begin_claim(target)  # pending: its transaction may land any time
    assert claim_id is not None and target.voucher.amount > target.charged
    status, answer = await close(provider, {"channelId": consumer.channel_id})
    assert (status, answer["finalAmount"]) == (200, str(target.voucher.amount))


@pytest.mark.rule(10)
async def test_the_claimer_holds_a_closing_channel_back_until_its_final_window(
    provider_factory: ProviderFactory, open_channel: ChannelFactory, chain: DevChain
) -> None:
    provider = await provider_factory(claim_threshold=1)
    consumer = await open_channel(provider, duration=1200)
    await paid_chat(provider.client(), consumer)
    (target,) = await provider.ledger.claim_targets(
        provider=provider.address, threshold=0, final_after=0, now=time.time(), force=True
    )  # read while open, as a claim cycle would just before the close
    assert (await close(provider, {"channelId": consumer.channel_id}))[0] == 200
    assert await provider.ledger.begin_claim(target) is None  # the transaction sees the close
    assert await provider.claimer.cycle() == []  # over the threshold, held back
    assert await provider.claimer.cycle(force=True) == []  # even forced
    await chain.travel(1200 - provider.settings.min_channel_ttl + 10)  # the final window
    await provider.claimer.clock.sync(provider.claimer.chain)
    (outcome,) = await provider.claimer.cycle()
    assert outcome.status == ClaimStatus.CONFIRMED


async def test_a_v1_channel_cannot_be_closed_cooperatively(
    provider_factory: ProviderFactory, open_channel: ChannelFactory
) -> None:
    """The real V1 test contract served beside V2: its channel is refused, the V2 one closes."""
    provider = await provider_factory(v1=True)
    v1 = await open_channel(provider, version="v1")
    v2 = await open_channel(provider)
    await paid_chat(provider.client(), v1)
    status, answer = await close(provider, {"channelId": v1.channel_id})
    assert (status, answer["error"]["code"]) == (400, "close_not_supported")
    assert "close(channelId) after its expiry" in answer["error"]["message"]
    assert (await record_of(provider, v1)).status is ChannelStatus.OPEN
    await paid_chat(provider.client(), v1)  # still served
    status, answer = await close(provider, {"channelId": v2.channel_id})
    assert status == 200 and answer["contract"] == provider.settings.contracts[0].address


@pytest.mark.parametrize("required", [False, True])
async def test_the_consumer_signature(
    provider_factory: ProviderFactory, open_channel: ChannelFactory, required: bool
) -> None:
    provider = await provider_factory(close_requires_signature=required)
    consumer = await open_channel(provider)
    channel = {"channelId": consumer.channel_id}
    now = int(time.time())
    refused = {
        "wrong signer": consumer_request(consumer, "close", key=bytes(Account.create().key)),
        "stale": consumer_request(consumer, "close", timestamp=now - 301),
        "ahead": consumer_request(consumer, "close", timestamp=now + 400),
        "usage signature": consumer_request(consumer, "usage"),
        "no timestamp": {"signature": consumer_request(consumer, "close")["signature"]},
        "no signature": {"timestamp": now},
        "short signature": {"timestamp": now, "signature": "0x1234"},
        "timestamp not a number": {**consumer_request(consumer, "close"), "timestamp": "soon"},
        "timestamp a bool": {**consumer_request(consumer, "close"), "timestamp": True},
    }
    for case, fields in refused.items():
        status, answer = await close(provider, {**channel, **fields})
        assert (status, answer["error"]["code"]) == (401, "invalid_consumer_signature"), case
    status, answer = await close(provider, channel)
    if required:
        assert (status, answer["error"]["code"]) == (401, "consumer_signature_required")
        assert (await record_of(provider, consumer)).status is ChannelStatus.OPEN
    else:
        assert status == 200
    signed = consumer_request(consumer, "close")
    signed["timestamp"] = str(signed["timestamp"])  # a decimal string does too
    status, answer = await close(provider, {**channel, **signed})
    assert status == 200 and int(answer["finalAmount"]) == 0


async def test_bad_close_requests_are_400_or_404_and_change_nothing(
    provider_factory: ProviderFactory, open_channel: ChannelFactory
) -> None:
    provider = await provider_factory()
    consumer = await open_channel(provider)
    other = await open_channel(Account.create().address)  # another provider's channel
    await paid_chat(provider.client(), consumer)
    before = await record_of(provider, consumer)
    for body in [b"", b"not json", b"[]", b'{"channelId": 5}', b'{"channelId": "0x12"}', b"{}",
                 json.dumps({"channelId": "0x" + "zz" * 32}).encode(),
                 json.dumps({"channelId": consumer.channel_id, "finalAmount": "1"}).encode(),
                 b'{"channelId": "' + b"\xff" * 4 + b'"}']:  # fmt: skip
        status, answer, headers = await call(provider, "POST", "/close-channel", data=body)
        assert (status, answer["error"]["code"], headers["X-DRAIN-Error"]) == (
            400,
            "invalid_request",
            "invalid_request",
        )
    for channel_id in ["0x" + "ab" * 32, other.channel_id]:
        status, answer = await close(provider, {"channelId": channel_id})
        assert (status, answer["error"]["code"]) == (404, "channel_not_found")
    assert await record_of(provider, consumer) == before
    await paid_chat(provider.client(), consumer)


async def test_a_channel_closed_without_our_authorization_is_404(
    provider_factory: ProviderFactory, open_channel: ChannelFactory, chain: DevChain
) -> None:
    provider = await provider_factory(chain_poll_interval=0.05)
    consumer = await open_channel(provider, duration=700)
    await paid_chat(provider.client(), consumer)
    await chain.travel(800)
    assert (await chain.client().send(consumer.account, chain.client().contract.functions.close(
        bytes.fromhex(consumer.channel_id[2:])))).succeeded  # fmt: skip
    await eventually(lambda: closed(provider, consumer))  # the chain watcher books it
    status, answer = await close(provider, {"channelId": consumer.channel_id})
    assert (status, answer["error"]["code"]) == (404, "channel_not_found")


async def test_refused_close_requests_count_toward_the_limit(provider_factory: ProviderFactory) -> None:
    provider = await provider_factory(payment_failures_per_minute=2)
    for _ in range(2):
        assert (await close(provider, {"channelId": "0x" + "cd" * 32}))[0] == 404
    status, answer = await close(provider, {"channelId": "0x" + "cd" * 32})
    assert (status, answer["error"]["code"]) == (429, "rate_limited")


@pytest.mark.rule(10)
async def test_with_the_rpc_down_the_ledgers_claimed_total_stands(
    anvil_chain: DevChain, rpc_proxy: RpcProxy, provider_factory: ProviderFactory, open_channel: ChannelFactory
) -> None:
    provider = await provider_factory(
        chain_client=ChainClient.over_http(rpc_proxy.url, anvil_chain.contract),
        on=anvil_chain,
        chain_poll_interval=3600,
    )
    consumer = await open_channel(provider, on=anvil_chain)
    await paid_chat(provider.client(), consumer)
    rpc_proxy.fail_next = 10
    status, answer = await close(provider, {"channelId": consumer.channel_id})
    assert (status, answer["finalAmount"]) == (200, str(consumer.charged))
    assert rpc_proxy.fail_next == 9  # one chain read was tried
    assert (await cooperative_close(anvil_chain, consumer, answer)).succeeded
