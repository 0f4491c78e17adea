"""The claim policy (docs/DESIGN.md, "Claim policy"): at the threshold when worth its gas, once
after the cut-off; short channels refused up front; the exact-amount path (X-DRAIN-Next-Min)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import aiohttp
import openai
import pytest
from helpers import DEMO_PRICE, ENGINES, ChannelFactory, Provider, ProviderFactory, paid_chat, refused_chat

from drain_provider.claim_policy import ClaimReason, claim_reason, gas_in_usdc, worth_its_gas
from drain_provider.devtools.demo_upstream import DEMO_MODEL
from drain_provider.devtools.devchain import DevChain
from drain_provider.ledger import ClaimTarget
from drain_provider.openai_format import parse_chat
from drain_provider.pricing import cost
from drain_provider.protocol import Voucher
from drain_provider.tokens import TokenCounter

# The tests that drive the app hold alike on both ledger engines.
both_engines = pytest.mark.parametrize("engine", ENGINES, indirect=True)

EXPIRY = 10_000
TTL = 600


def target(*, charged: int = 500, claimed: int = 0, reserved: int = 0) -> ClaimTarget:
    return ClaimTarget("0x" + "ab" * 32, EXPIRY, charged, claimed, reserved, 1, Voucher("0x" + "ab" * 32, 1, 1, b""))


def reason(now: float, **fields: int) -> ClaimReason | None:
    return claim_reason(target(**fields), now=now, threshold=1_000, min_channel_ttl=TTL)


@pytest.mark.rule(6)
@pytest.mark.rule(8)
def test_the_policy_claims_at_the_threshold_and_once_at_the_end() -> None:
    cutoff = EXPIRY - TTL
    assert reason(0) is None  # below the threshold, long before the end
    assert reason(0, charged=1_000) is ClaimReason.THRESHOLD
    assert reason(cutoff - 1, charged=999) is None  # the old one-hour margin would claim here
    assert reason(cutoff + 1) is None  # a request that passed the gate may still be reserving
    assert reason(cutoff + 10) is ClaimReason.FINAL
    assert reason(cutoff + 10, reserved=50) is None  # in flight: its charge is part of the final claim
    assert reason(EXPIRY - TTL // 2, reserved=50) is ClaimReason.FINAL  # but not at any risk
    assert reason(cutoff + 10, charged=500, claimed=500) is None  # nothing left


@pytest.mark.rule(10)
def test_a_closing_channel_is_claimed_only_in_its_final_window() -> None:
    cutoff = EXPIRY - TTL
    closing = replace(target(charged=5_000), closing=True)

    def why(now: float, *, force: bool = False) -> ClaimReason | None:
        return claim_reason(closing, now=now, threshold=1_000, min_channel_ttl=TTL, force=force)

    assert why(0) is None and why(cutoff - 1, force=True) is None  # over the threshold, even forced
    assert why(cutoff + 10) is ClaimReason.FINAL
    assert why(cutoff + 1, force=True) is ClaimReason.FORCED
    assert claim_reason(target(charged=5), now=0, threshold=1_000, min_channel_ttl=TTL, force=True) is (
        ClaimReason.FORCED
    )


def test_a_claim_is_worth_its_gas_only_if_it_brings_more() -> None:
    gas_wei = 100_000 * 30 * 10**9  # 100k gas at 30 gwei: 0.003 POL
    assert gas_in_usdc(gas_wei, 1_000_000) == 3_000  # at 1 USDC per POL
    assert worth_its_gas(payout=3_001, fee_bps=0, gas_wei=gas_wei, gas_token_price=1_000_000)
    assert not worth_its_gas(payout=3_000, fee_bps=0, gas_wei=gas_wei, gas_token_price=1_000_000)
    assert not worth_its_gas(payout=3_050, fee_bps=200, gas_wei=gas_wei, gas_token_price=1_000_000)  # net 2,989


@both_engines
@pytest.mark.rule(8)
async def test_a_threshold_claim_that_costs_more_gas_than_it_brings_is_held_but_the_final_one_is_not(
    provider: Provider, open_channel: ChannelFactory, chain: DevChain
) -> None:
    consumer = await open_channel(provider, duration=3600)
    await paid_chat(provider.client(), consumer)
    # A tiny threshold and a gas token priced at a million USDC: the claim would cost more than it brings.
    provider.claimer.settings = replace(provider.claimer.settings, claim_threshold=1, gas_token_price=10**12)
    (held,) = await provider.claimer.cycle()
    assert held.status == "held" and held.error is not None and "gas" in held.error
    assert (await chain.client().get_channel(consumer.channel_id)).claimed == 0  # nothing was sent
    await chain.travel(seconds=3600 - 600 + 60)  # past the cut-off: the final claim goes whatever its gas
    provider.claimer.settings = replace(provider.claimer.settings, claim_retry_seconds=0)
    await provider.ledger.execute("UPDATE channels SET claim_retry_at = NULL")
    (final,) = await provider.claimer.cycle()
    assert final.status == "confirmed" and final.amount >= consumer.charged


@both_engines
@pytest.mark.rule(8)
async def test_a_channel_shorter_than_the_cutoff_is_refused_with_the_minimum_duration(
    provider: Provider, open_channel: ChannelFactory
) -> None:
    consumer = await open_channel(provider, duration=300)  # MIN_CHANNEL_TTL is 600 s
    error = await refused_chat(provider.client(), consumer)
    assert error.response.headers["X-DRAIN-Error"] == "channel_expiring"
    assert "more than 600 s" in error.message
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{provider.url}/pricing") as resp:
            assert (await resp.json())["minChannelDurationSeconds"] == 601
        async with session.get(f"{provider.url}/docs") as resp:
            assert "duration = seconds; at least 601" in await resp.text()


@both_engines
@pytest.mark.rule(7)
async def test_next_min_lets_a_client_sign_exactly_what_a_request_needs(
    provider: Provider, open_channel: ChannelFactory
) -> None:
    consumer = await open_channel(provider)
    client = provider.client()
    first = await paid_chat(client, consumer, budget=50_000)  # signs far ahead, as MCP clients do
    next_min = int(first.headers["X-DRAIN-Next-Min"])
    total = int(first.headers["X-DRAIN-Total"])
    minimal = cost(DEMO_PRICE, 0, provider.settings.min_output_tokens)
    assert next_min == max(consumer.amount, total + minimal) == consumer.amount  # the credit covers it
    # A careful client on a fresh channel: exact vouchers, counted by the provider's own code.
    careful = await open_channel(provider)
    body: dict[str, Any] = {"model": DEMO_MODEL, "messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 40}
    input_cost = cost(
        DEMO_PRICE, parse_chat(body, {DEMO_MODEL: DEMO_PRICE}, default_max_tokens=1).input_tokens(TokenCounter()), 0
    )
    for _ in range(3):
        raw = await client.chat.completions.with_raw_response.create(
            **body, extra_headers={"X-DRAIN-Voucher": careful.voucher_for(body, DEMO_PRICE).header_value()}
        )
        careful.record(raw.headers)
    # Below Next-Min plus the input's cost, the next voucher is refused; at it, it is taken.
    floor = careful.next_min + input_cost
    with pytest.raises(openai.APIStatusError) as info:
        await client.chat.completions.create(
            **body, extra_headers={"X-DRAIN-Voucher": careful.sign(floor - 1).header_value()}
        )
    assert info.value.response.headers["X-DRAIN-Error"] in ("insufficient_funds", "invalid_amount")
    raw = await client.chat.completions.with_raw_response.create(
        **body, extra_headers={"X-DRAIN-Voucher": careful.sign(floor).header_value()}
    )
    careful.record(raw.headers)
    # What the provider can claim: the charge plus at most one request's unused worst case,
    # where the MCP-style client leaves its whole estimate on the table.
    claimed = {outcome.channel_id: outcome.amount for outcome in await provider.claimer.cycle(force=True)}
    assert careful.charged <= claimed[careful.channel_id] <= careful.charged + cost(DEMO_PRICE, 20, 40)
    assert claimed[consumer.channel_id] - consumer.charged > 10 * (claimed[careful.channel_id] - careful.charged)


@pytest.mark.rule(6)
async def test_a_one_hour_channel_with_steady_traffic_is_claimed_at_most_twice(
    anvil_chain: DevChain, provider_factory: ProviderFactory, open_channel: ChannelFactory
) -> None:
    from drain_provider.chain import ChainClient

    assert anvil_chain.rpc_url is not None
    provider = await provider_factory(
        chain_client=ChainClient.over_http(anvil_chain.rpc_url, anvil_chain.contract),
        on=anvil_chain,
        claim_interval=0.1,
        chain_poll_interval=0.05,
        claim_threshold=600,
    )
    consumer = await open_channel(provider, on=anvil_chain, duration=3600)
    client = provider.client()
    served = refused = 0
    for _ in range(14):  # a request every 4 minutes of chain time, claim cycles running meanwhile
        try:
            await paid_chat(client, consumer, budget=200, max_tokens=20)  # signs close to the charge
            served += 1
        except openai.APIStatusError as exc:
            assert exc.response.headers["X-DRAIN-Error"] == "channel_expiring"
            refused += 1
        await anvil_chain.travel(seconds=240)
        await asyncio.sleep(0.4)
    assert served >= 10 and refused >= 1
    for _ in range(100):  # under load, the final claim's cycle may still be running
        done = "SELECT 1 FROM channels WHERE channel_id = ? AND claimed >= charged"
        if await provider.ledger.fetchone(done, (consumer.channel_id,)) is not None:
            break
        await asyncio.sleep(0.1)
    claims = await provider.ledger.fetchall(
        "SELECT status, amount FROM claims WHERE channel_id = ? ORDER BY id", (consumer.channel_id,)
    )
    assert 1 <= len(claims) <= 2 and {status for status, _ in claims} == {"confirmed"}, claims
    on_chain = await anvil_chain.client().get_channel(consumer.channel_id)
    assert on_chain.claimed >= consumer.charged  # the final claim took everything
