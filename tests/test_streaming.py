"""Streaming: the openai SDK reads our SSE relay; every token is metered, none is served unpaid,
and every way a stream can end is settled exactly once."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
import openai
import pytest
from helpers import DEMO_PRICE, ChannelFactory, Provider, ProviderFactory, Upstream
from openai.types.chat import ChatCompletionMessageParam

from drain_provider.api.state import COUNTER
from drain_provider.consumer import DrainConsumer
from drain_provider.devtools.demo_upstream import demo_reply
from drain_provider.pricing import cost

LONG_REPLY = " ".join(f"word{i}" for i in range(300))


def directive(**options: Any) -> str:
    return "!demo " + json.dumps(options)


async def stream_chat(
    provider: Provider, consumer: DrainConsumer, content: str, *, budget: int = 200_000, **kwargs: Any
) -> tuple[str, list[Any]]:
    """Stream a chat completion through the SDK; the text and the chunks."""
    voucher = consumer.next_voucher(budget)
    stream = await provider.client().chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": content}],
        stream=True,
        extra_headers={"X-DRAIN-Voucher": voucher.header_value()},
        **kwargs,
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


async def raw_stream(
    provider: Provider, consumer: DrainConsumer, body: dict[str, Any], budget: int = 200_000
) -> tuple[int, Mapping[str, str], str]:
    """POST a streaming request with plain aiohttp; (status, headers, body text)."""
    headers = {"X-DRAIN-Voucher": consumer.next_voucher(budget).header_value()}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{provider.url}/chat/completions", json=body, headers=headers) as resp,
    ):
        return resp.status, resp.headers, await resp.text()


def cost_lines(text: str) -> dict[str, int]:
    return {name: int(value) for name, value in re.findall(r"^: (X-DRAIN-\w+): (\d+)$", text, re.MULTILINE)}


async def last_usage_row(provider: Provider) -> tuple[Any, ...]:
    row = await provider.ledger.fetchone(
        "SELECT status, input_tokens, output_tokens, usage_source, cost FROM usage ORDER BY id DESC LIMIT 1"
    )
    assert row is not None
    return row


async def charged(provider: Provider, consumer: DrainConsumer) -> int:
    record = await provider.ledger.get_channel(consumer.channel_id)
    assert record is not None and record.reserved == 0
    return record.charged


async def test_sdk_stream_without_usage(provider: Provider, open_channel: ChannelFactory) -> None:
    consumer = await open_channel(provider)
    text, chunks = await stream_chat(provider, consumer, "Stream me a reply")
    assert text == demo_reply("Stream me a reply")
    assert all(c.choices for c in chunks), "the usage-only chunk reached a client that did not ask"
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    status, _, _, source, row_cost = await last_usage_row(provider)
    assert (status, source) == ("ok", "upstream")
    assert await charged(provider, consumer) == row_cost > 0


@pytest.mark.rule(5)
async def test_sdk_stream_with_usage(provider: Provider, open_channel: ChannelFactory) -> None:
    consumer = await open_channel(provider)
    text, chunks = await stream_chat(provider, consumer, "Count me", stream_options={"include_usage": True})
    assert text == demo_reply("Count me")
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert usage.completion_tokens == provider.app[COUNTER].count_text("demo", text)
    _, input_tokens, output_tokens, source, row_cost = await last_usage_row(provider)
    assert (input_tokens, output_tokens, source) == (usage.prompt_tokens, usage.completion_tokens, "upstream")
    assert row_cost == cost(DEMO_PRICE, usage.prompt_tokens, usage.completion_tokens)


async def test_raw_stream_reports_costs_before_done(provider: Provider, open_channel: ChannelFactory) -> None:
    consumer = await open_channel(provider)
    figures = []
    for content in ("first", "second request, a little longer"):
        body = {"model": "demo", "messages": [{"role": "user", "content": content}], "stream": True}
        status, headers, text = await raw_stream(provider, consumer, body)
        assert status == 200
        assert headers["Content-Type"].startswith("text/event-stream")
        assert headers["Cache-Control"] == "no-cache"
        assert headers["X-DRAIN-Channel"] == consumer.channel_id
        assert int(headers["X-DRAIN-Reserved"]) > 0
        lines = cost_lines(text)
        assert list(lines) == ["X-DRAIN-Cost", "X-DRAIN-Total", "X-DRAIN-Remaining"]
        assert text.index(": X-DRAIN-Remaining") < text.index("data: [DONE]")
        assert text.endswith("data: [DONE]\n\n")
        figures.append(lines)
        row_cost = (await last_usage_row(provider))[4]
        assert lines["X-DRAIN-Cost"] == row_cost
        assert lines["X-DRAIN-Total"] == await charged(provider, consumer)
        assert lines["X-DRAIN-Remaining"] == consumer.deposit - lines["X-DRAIN-Total"]
    assert figures[1]["X-DRAIN-Total"] == figures[0]["X-DRAIN-Cost"] + figures[1]["X-DRAIN-Cost"]


@pytest.mark.parametrize(("mode", "value"), [("split", 17), ("merge", True), ("crlf", True), ("comments", True)])
async def test_awkward_framing_is_relayed_intact(
    provider: Provider, open_channel: ChannelFactory, mode: str, value: object
) -> None:
    """split: every 17-byte write its own read (a prime: the cuts fall at every offset of an
    event; byte-level cuts, inside characters too, are tests/test_sse.py's)."""
    consumer = await open_channel(provider)
    content = directive(**{mode: value})
    text, chunks = await stream_chat(provider, consumer, content, stream_options={"include_usage": True})
    assert text == demo_reply(content)
    usage = chunks[-1].usage
    assert usage is not None
    assert (await last_usage_row(provider))[4] == cost(DEMO_PRICE, usage.prompt_tokens, usage.completion_tokens)


async def test_legacy_completions_stream(provider: Provider, open_channel: ChannelFactory) -> None:
    consumer = await open_channel(provider)
    voucher = consumer.next_voucher(100_000)
    stream = await provider.client().completions.create(
        model="demo",
        prompt="Once upon a time",
        max_tokens=50,
        stream=True,
        extra_headers={"X-DRAIN-Voucher": voucher.header_value()},
    )
    text = "".join([c.choices[0].text async for c in stream if c.choices])
    assert text == demo_reply("Once upon a time")
    assert (await last_usage_row(provider))[0] == "ok"


@pytest.mark.rule(5)
async def test_client_disconnect_cancels_upstream_and_pays_what_was_delivered(
    provider: Provider, open_channel: ChannelFactory, upstream: Upstream
) -> None:
    consumer = await open_channel(provider)
    voucher = consumer.next_voucher(500_000)
    stream = await provider.client().chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": directive(reply=LONG_REPLY, token_delay=0.05)}],
        stream=True,
        extra_headers={"X-DRAIN-Voucher": voucher.header_value()},
    )
    received = 0
    async for chunk in stream:
        received += bool(chunk.choices and chunk.choices[0].delta.content)
        if received == 5:
            break
    await stream.close()
    closed_at = time.monotonic()
    deadline = closed_at + 5
    while not upstream.stats.streams_cancelled:
        assert time.monotonic() < deadline, "the upstream was never cancelled"
        await asyncio.sleep(0.01)
    sent, cancelled_at = upstream.stats.streams_cancelled[0]
    assert cancelled_at - closed_at < 1.0
    assert sent < 50  # it stopped generating, far before the 300-word reply's end
    while (await last_usage_row(provider))[0] == "reserved":
        await asyncio.sleep(0.01)
    status, input_tokens, output_tokens, source, row_cost = await last_usage_row(provider)
    assert (status, source) == ("partial", "local")
    assert 5 <= output_tokens <= sent
    assert row_cost == cost(DEMO_PRICE, input_tokens, output_tokens)
    assert await charged(provider, consumer) == row_cost


@pytest.mark.parametrize(("options", "status"), [({"status": 500}, 502), ({"status": 429}, 502), ({"delay": 3}, 504)])
@pytest.mark.rule(5)
async def test_upstream_failure_before_first_token_is_json_and_free(
    provider_factory: ProviderFactory, open_channel: ChannelFactory, options: dict[str, Any], status: int
) -> None:
    provider = await provider_factory(upstream_timeout=1.0)
    consumer = await open_channel(provider)
    with pytest.raises(openai.APIStatusError) as info:
        await stream_chat(provider, consumer, directive(**options))
    assert info.value.status_code == status
    assert info.value.response.headers["X-DRAIN-Error"] == "upstream_error"
    assert info.value.response.headers["Content-Type"].startswith("application/json")
    assert (await last_usage_row(provider))[0] == "failed"
    assert await charged(provider, consumer) == 0


async def test_upstream_refused_is_502_and_free(
    provider_factory: ProviderFactory, open_channel: ChannelFactory
) -> None:
    provider = await provider_factory(upstream_base_url="http://127.0.0.1:9/v1")
    consumer = await open_channel(provider)
    with pytest.raises(openai.APIStatusError) as info:
        await stream_chat(provider, consumer, "hello")
    assert info.value.status_code == 502
    assert await charged(provider, consumer) == 0


@pytest.mark.parametrize("how", ["die_after", "error_after"])
@pytest.mark.rule(5)
async def test_upstream_dying_mid_stream_sends_an_error_event(
    provider: Provider, open_channel: ChannelFactory, how: str
) -> None:
    consumer = await open_channel(provider)
    content = directive(reply=LONG_REPLY, **{how: 6})
    body = {"model": "demo", "messages": [{"role": "user", "content": content}], "stream": True}
    status, _, text = await raw_stream(provider, consumer, body)
    assert status == 200
    assert "event: error" in text and '"code":"upstream_error"' in text
    assert "data: [DONE]" not in text
    delivered = [json.loads(line[6:]) for line in text.splitlines() if line.startswith('data: {"id"')]
    words = "".join(c["choices"][0]["delta"].get("content") or "" for c in delivered)
    assert LONG_REPLY.startswith(words) and words
    row_status, input_tokens, output_tokens, source, row_cost = await last_usage_row(provider)
    assert (row_status, source) == ("partial", "local")
    assert output_tokens == provider.app[COUNTER].count_text("demo", words) == 6
    assert cost_lines(text)["X-DRAIN-Cost"] == row_cost == cost(DEMO_PRICE, input_tokens, 6)
    # The SDK surfaces the error event as an exception.
    with pytest.raises(openai.APIError, match="charged for what was delivered"):
        await stream_chat(provider, consumer, content)


@pytest.mark.parametrize("how", ["die_after", "error_after"])
@pytest.mark.rule(5)
async def test_a_stream_that_fails_before_its_first_content_token_is_free(
    provider: Provider, open_channel: ChannelFactory, how: str
) -> None:
    """The role chunk ({"role": "assistant"}, no content) reached the client, then the upstream
    failed: nothing was delivered, so nothing is charged, and the error event says so."""
    consumer = await open_channel(provider)
    content = directive(reply=LONG_REPLY, **{how: 0})
    body = {"model": "demo", "messages": [{"role": "user", "content": content}], "stream": True}
    status, _, text = await raw_stream(provider, consumer, body)
    assert status == 200
    delivered = [json.loads(line[6:]) for line in text.splitlines() if line.startswith('data: {"id"')]
    assert [c["choices"][0]["delta"].get("role") for c in delivered] == ["assistant"]
    assert "event: error" in text and "You were not charged." in text and "charged for what" not in text
    assert "data: [DONE]" not in text
    assert cost_lines(text)["X-DRAIN-Cost"] == 0
    row_status, _, output_tokens, _, row_cost = await last_usage_row(provider)
    assert (row_status, output_tokens, row_cost) == ("failed", 0, 0)
    assert await charged(provider, consumer) == 0
    with pytest.raises(openai.APIError, match="You were not charged"):
        await stream_chat(provider, consumer, content)


@pytest.mark.rule(5)
async def test_malformed_events_are_skipped_and_logged(
    provider: Provider, open_channel: ChannelFactory, caplog: pytest.LogCaptureFixture
) -> None:
    consumer = await open_channel(provider)
    content = directive(malformed_after=3)
    with caplog.at_level(logging.WARNING):
        text, _ = await stream_chat(provider, consumer, content, stream_options={"include_usage": True})
    assert text == demo_reply(content)
    assert "upstream_malformed_event count=1" in caplog.text
    _, input_tokens, output_tokens, source, row_cost = await last_usage_row(provider)
    assert source == "local" and output_tokens == provider.app[COUNTER].count_text("demo", text)
    assert row_cost == cost(DEMO_PRICE, input_tokens, output_tokens)


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.rule(3)
async def test_no_unpaid_tokens_when_the_upstream_ignores_max_tokens(
    provider: Provider, open_channel: ChannelFactory, include_usage: bool
) -> None:
    consumer = await open_channel(provider)
    content = directive(reply=LONG_REPLY, ignore_max_tokens=True)
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": content}]
    input_tokens = provider.app[COUNTER].count_messages("demo", list(messages))
    paid_tokens = 40
    voucher = consumer.sign(cost(DEMO_PRICE, input_tokens, paid_tokens))  # exactly 40 output tokens
    stream = await provider.client().chat.completions.create(
        model="demo",
        messages=messages,
        stream=True,
        stream_options={"include_usage": include_usage},
        extra_headers={"X-DRAIN-Voucher": voucher.header_value()},
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert 0 < provider.app[COUNTER].count_text("demo", text) <= paid_tokens
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    if include_usage:
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= paid_tokens
    status, _, output_tokens, _, row_cost = await last_usage_row(provider)
    assert status == "budget_stop" and output_tokens <= paid_tokens
    assert await charged(provider, consumer) == row_cost <= voucher.amount


@pytest.mark.rule(3)
async def test_a_stream_whose_upstream_over_reports_usage_costs_at_most_its_reservation(
    provider: Provider, open_channel: ChannelFactory
) -> None:
    consumer = await open_channel(provider)
    content = directive(prompt_tokens=5_000_000)
    body = {"model": "demo", "messages": [{"role": "user", "content": content}], "stream": True, "max_tokens": 100}
    status, headers, text = await raw_stream(provider, consumer, body, budget=1_000_000)
    assert status == 200 and text.endswith("data: [DONE]\n\n")
    reserved = int(headers["X-DRAIN-Reserved"])
    row = await provider.ledger.fetchone("SELECT status, usage_source, input_tokens, price_cost, cost FROM usage")
    assert row is not None
    row_status, source, input_tokens, price_cost, row_cost = row
    assert (row_status, source, input_tokens, row_cost) == ("ok", "upstream", 5_000_000, reserved)
    assert price_cost > reserved
    assert cost_lines(text)["X-DRAIN-Cost"] == reserved
    assert await charged(provider, consumer) == reserved


async def test_stream_body_errors_are_400(provider: Provider, open_channel: ChannelFactory) -> None:
    consumer = await open_channel(provider)
    body = {"model": "demo", "messages": [{"role": "user", "content": "x"}], "stream": True, "stream_options": 5}
    status, headers, _ = await raw_stream(provider, consumer, body)
    assert status == 400 and headers["X-DRAIN-Error"] == "invalid_request"
