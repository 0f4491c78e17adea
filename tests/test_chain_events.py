"""The books follow the chain: closes (expired and cooperative) are seen within a poll and booked
with what they really paid, the V2 fee included; known channels are re-checked; the chain clock
refuses expiring channels without waiting for a claim cycle."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from helpers import FEE_BPS, ChannelFactory, Provider, ProviderFactory, paid_chat, refused_chat, wait_for

from drain_provider.consumer import DrainConsumer
from drain_provider.devtools.devchain import DevChain
from drain_provider.protocol import close_authorization_digest, sign_digest
from drain_provider.states import ChannelStatus

TOKEN = "t" * 32


async def watched_provider(factory: ProviderFactory, on: DevChain, **overrides: Any) -> Provider:
    provider = await factory(on=on, chain_poll_interval=0.05, admin_token=TOKEN, **overrides)
    await wait_for(lambda: provider.watcher.last_poll_at is not None)
    return provider


async def cooperative_close(chain: DevChain, provider: Provider, consumer: DrainConsumer, final_amount: int) -> str:
    """What the MCP server does: the provider signs CloseAuthorization, the consumer sends it."""
    client = chain.client()
    digest = close_authorization_digest(provider.domain.separator, consumer.channel_id, final_amount)
    signature = sign_digest(provider.settings.provider_private_key, digest)
    call = client.contract.functions.cooperativeClose(bytes.fromhex(consumer.channel_id[2:]), final_amount, signature)
    result = await client.send(consumer.account, call)
    assert result.succeeded
    return result.tx_hash


async def admin(provider: Provider, path: str) -> Any:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{provider.url}/admin/{path}", headers={"Authorization": f"Bearer {TOKEN}"}) as resp,
    ):
        assert resp.status == 200
        return await resp.json()


async def health(provider: Provider) -> Any:
    async with aiohttp.ClientSession() as session, session.get(provider.url.removesuffix("/v1") + "/health") as resp:
        return await resp.json()


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def closed(provider: Provider, consumer: DrainConsumer) -> bool:
    record = await provider.ledger.get_channel(consumer.channel_id)
    return record is not None and record.status is ChannelStatus.CLOSED


@pytest.mark.rule(9)
async def test_a_cooperative_close_paid_in_full_is_booked_with_its_fee_and_refused_within_a_poll(
    provider_factory: ProviderFactory,
    open_channel: ChannelFactory,
    fee_chain: DevChain,
    caplog: pytest.LogCaptureFixture,
) -> None:
    provider = await watched_provider(provider_factory, fee_chain)
    consumer = await open_channel(provider, on=fee_chain)
    for _ in range(3):
        await paid_chat(provider.client(), consumer)
    charged = consumer.charged
    with caplog.at_level(logging.INFO):
        tx_hash = await cooperative_close(fee_chain, provider, consumer, charged)
        await eventually(lambda: closed(provider, consumer))  # no claim cycle runs: only the watcher sees it
    record = await provider.ledger.get_channel(consumer.channel_id)
    assert record is not None
    fee = charged * FEE_BPS // 10_000
    assert (record.close_kind, record.claimed, record.fee, record.lost) == ("cooperative", charged, fee, 0)
    assert await fee_chain.usdc_balance(provider.address) == charged - fee
    assert "ERROR" not in caplog.text and f"tx={tx_hash}" in caplog.text
    error = await refused_chat(provider.client(), consumer)
    assert error.response.headers["X-DRAIN-Error"] == "channel_not_found"


@pytest.mark.rule(9)
async def test_books_after_claims_and_an_expired_close_show_gross_fee_net_and_credit(
    provider_factory: ProviderFactory,
    open_channel: ChannelFactory,
    fee_chain: DevChain,
    caplog: pytest.LogCaptureFixture,
) -> None:
    provider = await watched_provider(provider_factory, fee_chain)
    consumer = await open_channel(provider, on=fee_chain, duration=1200)
    for _ in range(2):
        await paid_chat(provider.client(), consumer, budget=5_000)  # signs ahead: credit
    charged = consumer.charged
    (outcome,) = await provider.claimer.cycle(force=True)
    assert outcome.status == "confirmed" and outcome.amount > charged  # the smallest voucher above
    (claim,) = (await admin(provider, "claims"))["claims"]
    payout, fee = outcome.amount, outcome.amount * FEE_BPS // 10_000
    assert (claim["payout"], claim["fee"]) == (str(payout), str(fee))

    stats = await admin(provider, "stats")
    books = stats["books"]
    assert books["earned"] == {"baseUnits": str(charged), "usdc": f"0.{charged:06d}".rstrip("0")}
    assert int(books["claimed"]["baseUnits"]) == payout and int(books["fee"]["baseUnits"]) == fee
    assert int(books["received"]["baseUnits"]) == payout - fee == await fee_chain.usdc_balance(provider.address)
    assert int(books["creditTaken"]["baseUnits"]) == payout - charged
    assert books["unclaimed"]["baseUnits"] == books["lost"]["baseUnits"] == "0" and books["feeBps"] == FEE_BPS
    assert (await health(provider))["books"] == books  # one shape, the same figures

    # The consumer closes after expiry: the channel was claimed in full, nothing is lost.
    await fee_chain.travel(seconds=1300)
    client = fee_chain.client()
    with caplog.at_level(logging.INFO):
        result = await client.send(
            consumer.account, client.contract.functions.close(bytes.fromhex(consumer.channel_id[2:]))
        )
        assert result.succeeded
        await eventually(lambda: closed(provider, consumer))
    record = await provider.ledger.get_channel(consumer.channel_id)
    assert record is not None and record.close_kind == "expired"
    assert (record.claimed, record.fee, record.lost) == (payout, fee, 0)  # not the 0 a deleted channel reads
    assert "ERROR" not in caplog.text
    after = (await admin(provider, "stats"))["books"]
    assert after["claimed"] == books["claimed"] and after["channels"] == {"open": 0, "closing": 0, "closed": 1}


@pytest.mark.rule(9)
async def test_a_close_the_logs_missed_is_found_by_the_refresh(
    provider_factory: ProviderFactory, open_channel: ChannelFactory, fee_chain: DevChain
) -> None:
    # The watcher polls once an hour: the claim cycle's refresh finds the close and its event.
    provider = await provider_factory(on=fee_chain, chain_poll_interval=3600)
    await wait_for(lambda: provider.watcher.last_poll_at is not None)
    consumer = await open_channel(provider, on=fee_chain)
    await paid_chat(provider.client(), consumer)
    await cooperative_close(fee_chain, provider, consumer, consumer.charged)
    await provider.claimer.cycle()
    record = await provider.ledger.get_channel(consumer.channel_id)
    assert record is not None and record.status is ChannelStatus.CLOSED
    assert (record.close_kind, record.claimed, record.lost) == ("cooperative", consumer.charged, 0)


@pytest.mark.rule(8)
async def test_the_chain_clock_refuses_an_expiring_channel_without_a_claim_cycle(
    provider_factory: ProviderFactory, open_channel: ChannelFactory, chain: DevChain
) -> None:
    provider = await watched_provider(provider_factory, chain)
    consumer = await open_channel(provider, duration=1200)
    await paid_chat(provider.client(), consumer)
    moved_to = await chain.travel(seconds=700)  # 500 s left: inside MIN_CHANNEL_TTL (600 s)
    await wait_for(lambda: provider.watcher.clock.now() >= moved_to)
    error = await refused_chat(provider.client(), consumer)
    assert error.response.headers["X-DRAIN-Error"] == "channel_expiring"


@pytest.mark.rule(1)
async def test_a_known_channel_is_checked_against_the_providers_key(
    provider_factory: ProviderFactory, open_channel: ChannelFactory, tmp_path: Any
) -> None:
    ledger = tmp_path / "shared.db"
    first = await provider_factory(database_path=ledger)
    consumer = await open_channel(first)
    await paid_chat(first.client(), consumer)
    await first.server.close()
    # The operator changed PROVIDER_PRIVATE_KEY and kept the ledger: the channel pays someone else.
    second = await provider_factory(database_path=ledger)
    assert second.address != first.address
    error = await refused_chat(second.client(), consumer)
    assert error.response.headers["X-DRAIN-Error"] == "wrong_provider"
    # Nor does its claimer try to claim what only the old key can.
    assert await second.claimer.cycle(force=True) == []


@pytest.mark.rule(9)
async def test_a_close_while_the_server_was_down_is_found_at_the_next_start(
    provider_factory: ProviderFactory, open_channel: ChannelFactory, fee_chain: DevChain, tmp_path: Any
) -> None:
    ledger = tmp_path / "restart.db"
    first = await watched_provider(provider_factory, fee_chain, database_path=ledger)
    consumer = await open_channel(first, on=fee_chain)
    await paid_chat(first.client(), consumer)
    key = first.settings.provider_private_key
    await first.server.close()
    await cooperative_close(fee_chain, first, consumer, consumer.charged)  # while it is down
    # The same provider starts again, with no claim cycle: the watcher resumes the logs.
    second = await watched_provider(provider_factory, fee_chain, database_path=ledger, provider_private_key=key)
    await eventually(lambda: closed(second, consumer))
    record = await second.ledger.get_channel(consumer.channel_id)
    assert record is not None and (record.close_kind, record.claimed, record.lost) == (
        "cooperative",
        consumer.charged,
        0,
    )
