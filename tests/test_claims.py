"""The claimer on a real EVM: what is earned becomes USDC in the provider's account, by the exact
amount, at the threshold or before expiry, once; and channels are kept honest."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
from helpers import ENGINES, ChannelFactory, Provider, ProviderFactory, paid_chat, refused_chat

from drain_provider.consumer import DrainConsumer
from drain_provider.devtools.devchain import DevChain

# Money and claims hold alike on both ledger engines.
pytestmark = pytest.mark.parametrize("engine", ENGINES, indirect=True)


async def charged(provider: Provider, consumer: DrainConsumer) -> int:
    record = await provider.ledger.get_channel(consumer.channel_id)
    assert record is not None
    return record.charged


async def voucher_amounts(provider: Provider, consumer: DrainConsumer) -> list[int]:
    rows = await provider.ledger.fetchall(
        "SELECT amount FROM vouchers WHERE channel_id = ? ORDER BY id", (consumer.channel_id,)
    )
    return [amount for (amount,) in rows]


def set_threshold(provider: Provider, threshold: int) -> None:
    provider.claimer.settings = replace(provider.claimer.settings, claim_threshold=threshold)


@pytest.mark.rule(6)
@pytest.mark.rule(7)
async def test_claims_at_the_threshold_by_the_exact_amount(
    provider: Provider, open_channel: ChannelFactory, chain: DevChain
) -> None:
    below, at, above = [await open_channel(provider) for _ in range(3)]
    client = provider.client()
    await paid_chat(client, below, content="short")
    for consumer in (at, above):
        await paid_chat(client, consumer, content="a longer question, so that it costs more")
        await paid_chat(client, consumer, content="and a second one")
    await paid_chat(client, above, content="one more")
    threshold = await charged(provider, at)
    assert await charged(provider, below) < threshold < await charged(provider, above)
    set_threshold(provider, threshold)
    provider_before = await chain.usdc_balance(provider.address)
    contract_before = await chain.usdc_balance(chain.contract)

    outcomes = await provider.claimer.cycle()

    assert sorted(o.channel_id for o in outcomes) == sorted([at.channel_id, above.channel_id])
    assert {o.status for o in outcomes} == {"confirmed"}
    paid = 0
    by_channel = {o.channel_id: o for o in outcomes}
    for consumer in (at, above):
        outcome = by_channel[consumer.channel_id]
        # docs/DESIGN.md rule 7: the smallest voucher covering what was charged, not the highest signed.
        total = await charged(provider, consumer)
        expected = min(a for a in await voucher_amounts(provider, consumer) if a >= total)
        assert outcome.amount == expected < consumer.amount
        on_chain = await chain.client().get_channel(consumer.channel_id)
        assert on_chain.claimed == expected
        record = await provider.ledger.get_channel(consumer.channel_id)
        assert record is not None and record.claimed == expected
        paid += expected
    assert await chain.usdc_balance(provider.address) == provider_before + paid
    assert await chain.usdc_balance(chain.contract) == contract_before - paid
    assert (await chain.client().get_channel(below.channel_id)).claimed == 0
    # Nothing is due any more: a second cycle claims nothing.
    assert await provider.claimer.cycle() == []
    rows = await provider.ledger.fetchall("SELECT status, tx_hash FROM claims")
    assert len(rows) == 2 and all(status == "confirmed" and tx for status, tx in rows)


@pytest.mark.rule(7)
async def test_credit_above_the_claim_stays_the_consumers(provider: Provider, open_channel: ChannelFactory) -> None:
    consumer = await open_channel(provider)
    client = provider.client()
    await paid_chat(client, consumer, budget=100_000)
    set_threshold(provider, 1)
    (outcome,) = await provider.claimer.cycle()
    assert outcome.amount == 100_000  # the consumer's only voucher
    # The chain now holds 100,000 claimed against a charge of about a hundred: the rest is the
    # consumer's credit, and its next requests spend it without signing for more.
    raw = await paid_chat(client, consumer, budget=1)
    assert int(raw.headers["X-DRAIN-Cost"]) > 0
    assert consumer.amount == 100_000
    assert await provider.claimer.cycle() == []  # charged is still below what the chain holds


@pytest.mark.rule(6)
@pytest.mark.rule(8)
async def test_a_channel_below_the_threshold_is_claimed_once_after_the_cutoff(
    provider: Provider, open_channel: ChannelFactory, chain: DevChain
) -> None:
    consumer = await open_channel(provider, duration=7200)
    await paid_chat(provider.client(), consumer)
    assert await provider.claimer.cycle() == []  # far below the 10 USDC threshold
    await chain.travel(seconds=7200 - 600 - 60)  # a minute before the cut-off: still nothing
    assert await provider.claimer.cycle() == []
    await paid_chat(provider.client(), consumer)
    await chain.travel(seconds=120)  # past the cut-off: no more vouchers, so one claim takes all
    (outcome,) = await provider.claimer.cycle()
    assert outcome.status == "confirmed" and outcome.amount >= consumer.charged
    assert (await chain.client().get_channel(consumer.channel_id)).claimed == outcome.amount
    assert await provider.claimer.cycle() == []  # and never again


@pytest.mark.rule(8)
async def test_vouchers_near_expiry_are_refused(
    provider: Provider, open_channel: ChannelFactory, chain: DevChain
) -> None:
    consumer = await open_channel(provider, duration=1200)
    await paid_chat(provider.client(), consumer)
    await chain.travel(seconds=700)  # 500 s left, below MIN_CHANNEL_TTL (600 s)
    await provider.claimer.cycle()  # the provider learns the chain's time
    error = await refused_chat(provider.client(), consumer)
    assert error.response.headers["X-DRAIN-Error"] == "channel_expiring"


@pytest.mark.rule(9)
async def test_closed_channel_is_marked_and_refused(
    provider: Provider, open_channel: ChannelFactory, chain: DevChain, caplog: pytest.LogCaptureFixture
) -> None:
    consumer = await open_channel(provider, duration=1200)
    await paid_chat(provider.client(), consumer)
    await chain.travel(seconds=1300)
    # The provider slept through the expiry and the consumer closes first: the earnings are lost.
    client = chain.client()
    closed = await client.send(
        consumer.account, client.contract.functions.close(bytes.fromhex(consumer.channel_id[2:]))
    )
    assert closed.succeeded
    with caplog.at_level(logging.INFO):
        outcomes = await provider.claimer.cycle()
    assert outcomes == []
    record = await provider.ledger.get_channel(consumer.channel_id)
    assert record is not None and record.status == "closed"
    assert record.close_kind == "expired" and record.lost == record.charged > 0
    assert f"channel_closed channel={consumer.channel_id} kind=expired" in caplog.text
    assert f"lost={record.charged}" in caplog.text
    error = await refused_chat(provider.client(), consumer)
    assert error.response.headers["X-DRAIN-Error"] == "channel_not_found"


@pytest.mark.rule(9)
async def test_already_claimed_revert_is_reconciled_not_retried(
    provider: Provider, open_channel: ChannelFactory, chain: DevChain
) -> None:
    from eth_account import Account

    from drain_provider.protocol import Voucher

    consumer = await open_channel(provider)
    await paid_chat(provider.client(), consumer, budget=50_000)
    set_threshold(provider, 1)
    # Someone (an earlier run, another tool) claimed the same voucher behind the ledger's back.
    amount, nonce, signature = (await provider.ledger.fetchone("SELECT amount, nonce, signature FROM vouchers")) or ()
    voucher = Voucher(consumer.channel_id, amount, int(nonce), bytes.fromhex(signature[2:]))
    result = await chain.client().claim(Account.from_key(provider.settings.provider_private_key), voucher)
    assert result.succeeded

    (outcome,) = await provider.claimer.claim_due()  # straight to claiming, the ledger still stale
    assert (outcome.status, outcome.error) == ("reverted", "InvalidAmount")
    record = await provider.ledger.get_channel(consumer.channel_id)
    assert record is not None and record.claimed == amount  # reconciled from the chain
    for _ in range(3):
        assert await provider.claimer.cycle() == []  # and not retried
    assert await chain.usdc_balance(provider.address) == amount


async def test_empty_gas_account_is_a_loud_alert(
    provider_factory: ProviderFactory, open_channel: ChannelFactory, caplog: pytest.LogCaptureFixture
) -> None:
    import aiohttp

    provider = await provider_factory(fund=False, admin_token="t" * 32, claim_threshold=1)
    consumer = await open_channel(provider)
    await paid_chat(provider.client(), consumer)
    with caplog.at_level(logging.ERROR):
        (outcome,) = await provider.claimer.cycle()
    assert (outcome.status, outcome.error) == ("failed", "insufficient_gas_funds")
    assert "claim_blocked reason=insufficient_gas_funds" in caplog.text
    async with aiohttp.ClientSession() as session:
        async with session.get(str(provider.server.make_url("/health"))) as resp:
            health = await resp.json()
        headers = {"Authorization": "Bearer " + "t" * 32}
        async with session.get(f"{provider.url}/admin/stats", headers=headers) as resp:
            stats = await resp.json()
    assert health["status"] == "degraded" and health["alert"] == "insufficient_gas_funds"
    assert stats["alert"] == "insufficient_gas_funds" and stats["gasBalanceWei"] == "0"
    # Backoff: the next cycle does not hammer the chain with the same doomed claim.
    assert await provider.claimer.cycle() == []


async def test_fee_ceiling_defers_the_claim(provider_factory: ProviderFactory, open_channel: ChannelFactory) -> None:
    provider = await provider_factory(max_fee_per_gas=1, claim_threshold=1)
    consumer = await open_channel(provider)
    await paid_chat(provider.client(), consumer)
    (outcome,) = await provider.claimer.cycle()
    assert outcome.status == "failed" and outcome.error is not None and outcome.error.startswith("fee_above_ceiling")
    assert outcome.tx_hash is None  # nothing was sent
