"""Paid completions end to end: the openai SDK -> provider -> demo upstream, on a real EVM."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, cast

import openai
import pytest
from helpers import DEMO_PRICE, ENGINES, ChannelFactory, Provider, ProviderFactory, Upstream, paid_chat

from drain_provider.api.state import COUNTER
from drain_provider.devtools.demo_upstream import demo_reply
from drain_provider.pricing import cost
from drain_provider.protocol import Voucher

# Money and claims hold alike on both ledger engines.
pytestmark = pytest.mark.parametrize("engine", ENGINES, indirect=True)


async def test_paid_call_returns_completion_and_cost_headers(provider: Provider, open_channel: ChannelFactory) -> None:
    consumer = await open_channel(provider)
    raw = await paid_chat(provider.client(), consumer, content="What is DRAIN?")
    completion = raw.parse()
    assert completion.choices[0].message.content == demo_reply("What is DRAIN?")
    usage = completion.usage
    assert usage is not None and usage.prompt_tokens > 0 and usage.completion_tokens > 0
    expected = cost(DEMO_PRICE, usage.prompt_tokens, usage.completion_tokens)
    assert int(raw.headers["X-DRAIN-Cost"]) == expected
    assert int(raw.headers["X-DRAIN-Total"]) == expected
    assert int(raw.headers["X-DRAIN-Remaining"]) == consumer.deposit - expected
    assert raw.headers["X-DRAIN-Channel"] == consumer.channel_id


async def test_totals_equal_sum_of_costs_and_ledger(provider: Provider, open_channel: ChannelFactory) -> None:
    consumer = await open_channel(provider)
    client = provider.client()
    costs = []
    for i in range(6):
        raw = await paid_chat(client, consumer, content="count " * (i * 7 + 1))
        usage = raw.parse().usage
        assert int(raw.headers["X-DRAIN-Cost"]) == cost(DEMO_PRICE, usage.prompt_tokens, usage.completion_tokens)
        costs.append(int(raw.headers["X-DRAIN-Cost"]))
        assert int(raw.headers["X-DRAIN-Total"]) == sum(costs)
        assert int(raw.headers["X-DRAIN-Remaining"]) == consumer.deposit - sum(costs)
    record = await provider.ledger.get_channel(consumer.channel_id)
    assert record is not None
    assert record.charged == sum(costs)
    assert record.reserved == 0
    assert record.last_nonce == consumer.nonce == 6
    rows = await provider.ledger.fetchall(
        "SELECT cost, status, usage_source FROM usage WHERE channel_id = ? ORDER BY id", (consumer.channel_id,)
    )
    assert [r[0] for r in rows] == costs
    assert {r[1] for r in rows} == {"ok"} and {r[2] for r in rows} == {"upstream"}


async def test_legacy_completions_are_paid_too(provider: Provider, open_channel: ChannelFactory) -> None:
    consumer = await open_channel(provider)
    voucher = consumer.next_voucher(50_000)
    raw = await provider.client().completions.with_raw_response.create(
        model="demo", prompt="Once upon a time", max_tokens=5, extra_headers={"X-DRAIN-Voucher": voucher.header_value()}
    )
    completion = raw.parse()
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 5
    assert completion.choices[0].finish_reason == "length"
    assert int(raw.headers["X-DRAIN-Cost"]) == cost(DEMO_PRICE, completion.usage.prompt_tokens, 5)


@pytest.mark.rule(5)
async def test_usage_missing_upstream_is_counted_locally(provider: Provider, open_channel: ChannelFactory) -> None:
    consumer = await open_channel(provider)
    directive = '!demo {"usage": false}'
    raw = await paid_chat(provider.client(), consumer, content=directive)
    assert raw.parse().usage is None
    counter = provider.app[COUNTER]
    out_tokens = counter.count_text("demo", demo_reply(directive))
    in_tokens = counter.count_messages("demo", [{"role": "user", "content": directive}])
    assert int(raw.headers["X-DRAIN-Cost"]) == cost(DEMO_PRICE, in_tokens, out_tokens)
    row = await provider.ledger.fetchone("SELECT usage_source, output_tokens FROM usage")
    assert row == ("local", out_tokens)


@pytest.mark.rule(3)
async def test_an_upstream_that_over_reports_usage_is_charged_no_more_than_the_reservation(
    provider: Provider, open_channel: ChannelFactory, caplog: pytest.LogCaptureFixture
) -> None:
    consumer = await open_channel(provider)
    directive = '!demo {"prompt_tokens": 5000000}'
    with caplog.at_level(logging.WARNING):
        raw = await paid_chat(provider.client(), consumer, content=directive, budget=1_000_000, max_tokens=100)
    reported = raw.parse().usage
    assert reported is not None and reported.prompt_tokens == 5_000_000
    row = await provider.ledger.fetchone("SELECT reserved, price_cost, cost, usage_source FROM usage")
    assert row is not None
    reserved, price_cost, row_cost, source = row
    assert price_cost == cost(DEMO_PRICE, 5_000_000, reported.completion_tokens)  # kept, to count the excess
    assert int(raw.headers["X-DRAIN-Cost"]) == row_cost == reserved < price_cost
    assert source == "upstream"
    assert f"charge_over_reservation channel={consumer.channel_id}" in caplog.text
    assert f"reported_in=5000000 reported_out={reported.completion_tokens}" in caplog.text
    assert f"price_cost={price_cost} reserved={reserved}" in caplog.text


LONG_REPLY = " ".join(f"word{i}" for i in range(300))


@pytest.mark.rule(3)
async def test_a_json_answer_that_ignores_max_tokens_is_cut_at_the_reservation(
    provider: Provider, open_channel: ChannelFactory, caplog: pytest.LogCaptureFixture
) -> None:
    consumer = await open_channel(provider)
    content = "!demo " + json.dumps({"ignore_max_tokens": True, "reply": LONG_REPLY})
    with caplog.at_level(logging.WARNING):
        raw = await paid_chat(provider.client(), consumer, content=content, budget=1_000_000, max_tokens=20)
    completion = raw.parse()
    text = completion.choices[0].message.content
    counter = provider.app[COUNTER]
    assert text and LONG_REPLY.startswith(text) and counter.count_text("demo", text) == 20
    assert completion.choices[0].finish_reason == "length"
    # The relayed usage is ours: the counted input and the output the client got.
    in_tokens = counter.count_messages("demo", [{"role": "user", "content": content}])
    usage = completion.usage
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (in_tokens, 20)
    assert usage.total_tokens == in_tokens + 20
    row = await provider.ledger.fetchone("SELECT status, usage_source, output_tokens, reserved, cost FROM usage")
    assert row == ("budget_stop", "local", 20, cost(DEMO_PRICE, in_tokens, 20), cost(DEMO_PRICE, in_tokens, 20))
    assert int(raw.headers["X-DRAIN-Cost"]) == cost(DEMO_PRICE, in_tokens, 20)
    reported_out = counter.count_text("demo", LONG_REPLY)
    assert f"answer_cut_at_budget channel={consumer.channel_id} reported_out={reported_out} limit=20" in caplog.text


@pytest.mark.rule(3)
async def test_a_legacy_answer_that_ignores_max_tokens_is_cut_at_the_reservation(
    provider: Provider, open_channel: ChannelFactory
) -> None:
    consumer = await open_channel(provider)
    prompt = "!demo " + json.dumps({"ignore_max_tokens": True, "reply": LONG_REPLY})
    voucher = consumer.next_voucher(1_000_000)
    raw = await provider.client().completions.with_raw_response.create(
        model="demo", prompt=prompt, max_tokens=7, extra_headers={"X-DRAIN-Voucher": voucher.header_value()}
    )
    completion = raw.parse()
    counter = provider.app[COUNTER]
    assert LONG_REPLY.startswith(completion.choices[0].text)
    assert counter.count_text("demo", completion.choices[0].text) == 7
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 7
    in_tokens = counter.count_prompt("demo", prompt)
    assert int(raw.headers["X-DRAIN-Cost"]) == cost(DEMO_PRICE, in_tokens, 7)


@pytest.mark.rule(2)
async def test_max_tokens_is_capped_to_what_the_voucher_pays_for(
    provider: Provider, open_channel: ChannelFactory, upstream: Upstream
) -> None:
    consumer = await open_channel(provider)
    client = provider.client()
    # Tiny headroom: the input (about 12 tokens = 12 base units) plus 20 output tokens (40 units).
    raw = await paid_chat(client, consumer, budget=52, max_tokens=1000)
    sent = upstream.stats.requests[-1]
    assert 16 <= sent["max_tokens"] <= 21
    assert raw.parse().usage.completion_tokens == sent["max_tokens"]
    assert int(raw.headers["X-DRAIN-Total"]) <= consumer.amount


async def test_client_max_tokens_is_kept_when_paid_for(
    provider: Provider, open_channel: ChannelFactory, upstream: Upstream
) -> None:
    consumer = await open_channel(provider)
    await paid_chat(provider.client(), consumer, budget=1_000_000, max_tokens=7)
    assert upstream.stats.requests[-1]["max_tokens"] == 7
    await paid_chat(provider.client(), consumer, budget=1_000_000, max_completion_tokens=9)
    sent = upstream.stats.requests[-1]
    assert sent["max_completion_tokens"] == 9 and "max_tokens" not in sent


@pytest.mark.parametrize(
    ("directive", "status"),
    [
        ('!demo {"status": 500}', 502),
        ('!demo {"status": 429}', 502),
        ('!demo {"status": 400}', 502),
        ('!demo {"invalid_json": true}', 502),
        ('!demo {"delay": 3}', 504),
    ],
)
@pytest.mark.rule(5)
async def test_upstream_failures_are_not_charged(
    provider_factory: ProviderFactory, open_channel: ChannelFactory, directive: str, status: int
) -> None:
    provider = await provider_factory(upstream_timeout=1.0)
    consumer = await open_channel(provider)
    with pytest.raises(openai.APIStatusError) as info:
        await paid_chat(provider.client(), consumer, content=directive)
    assert info.value.status_code == status
    assert info.value.response.headers["X-DRAIN-Error"] == "upstream_error"
    body = cast(dict[str, Any], info.value.body)
    assert body["code"] == "upstream_error"
    assert "not charged" in body["message"]
    record = await provider.ledger.get_channel(consumer.channel_id)
    assert record is not None and record.charged == 0 and record.reserved == 0
    row = await provider.ledger.fetchone("SELECT status, cost FROM usage")
    assert row == ("failed", 0)
    # The voucher itself was valid and stays accepted: the next one must use a higher nonce.
    assert record.last_nonce == consumer.nonce


async def test_upstream_unreachable_is_502_and_not_charged(
    provider_factory: ProviderFactory, open_channel: ChannelFactory
) -> None:
    provider = await provider_factory(upstream_base_url="http://127.0.0.1:9/v1")
    consumer = await open_channel(provider)
    with pytest.raises(openai.APIStatusError) as info:
        await paid_chat(provider.client(), consumer)
    assert info.value.status_code == 502
    assert info.value.response.headers["X-DRAIN-Error"] == "upstream_error"
    record = await provider.ledger.get_channel(consumer.channel_id)
    assert record is not None and record.charged == 0 and record.reserved == 0


@pytest.mark.rule(2)
@pytest.mark.rule(3)
async def test_twenty_concurrent_calls_never_overcharge(provider: Provider, open_channel: ChannelFactory) -> None:
    consumer = await open_channel(provider)
    client = provider.client()
    # Twenty racing vouchers, signed in nonce order but sent all at once: some arrive out of
    # order and are refused; whatever is accepted, charged never passes the last voucher.
    vouchers = [consumer.sign(amount=400 * (i + 1)) for i in range(20)]

    async def call(voucher: Voucher) -> tuple[int, str]:
        try:
            raw = await client.chat.completions.with_raw_response.create(
                model="demo",
                messages=[{"role": "user", "content": "race"}],
                max_tokens=200,
                extra_headers={"X-DRAIN-Voucher": voucher.header_value()},
            )
            return 200, raw.headers["X-DRAIN-Cost"]
        except openai.APIStatusError as exc:
            return exc.status_code, exc.response.headers["X-DRAIN-Error"]

    results = await asyncio.gather(*(call(v) for v in vouchers))
    ok = [int(r[1]) for r in results if r[0] == 200]
    refused = [r[1] for r in results if r[0] != 200]
    assert ok, results
    assert set(refused) <= {"invalid_nonce", "invalid_amount", "insufficient_funds"}
    record = await provider.ledger.get_channel(consumer.channel_id)
    assert record is not None
    assert record.charged == sum(ok)
    assert record.charged <= record.last_amount
    assert record.reserved == 0
    stored = await provider.ledger.fetchall("SELECT amount FROM vouchers WHERE channel_id = ?", (consumer.channel_id,))
    assert record.last_amount == max(a for (a,) in stored)
