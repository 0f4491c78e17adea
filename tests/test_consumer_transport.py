"""The consumer kit's transport: the official openai SDK (and LangChain's ChatOpenAI) paying a
real provider through `drain_http_client`, no voucher code in the caller: each request carries
the exact voucher for its body, and the costs the kit records (from headers, and from a stream's
comment lines the SDK itself drops) are the ledger's."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
from helpers import DEMO_PRICE, ChannelFactory, Provider

from drain_provider.consumer import DrainConsumer
from drain_provider.consumer.transport import (
    VoucherSigner,
    drain_async_http_client,
    drain_http_client,
)
from drain_provider.devtools.demo_upstream import DEMO_MODEL

MESSAGES: list[Any] = [{"role": "user", "content": "Hello through the kit!"}]


async def ledger_costs(provider: Provider, consumer: DrainConsumer) -> list[int]:
    rows = await provider.ledger.fetchall(
        "SELECT cost FROM usage WHERE channel_id = ? AND status = 'ok' ORDER BY id", (consumer.channel_id,)
    )
    return [int(r[0]) for r in rows]


async def voucher_amounts(provider: Provider, consumer: DrainConsumer) -> list[int]:
    rows = await provider.ledger.fetchall(
        "SELECT amount FROM vouchers WHERE channel_id = ? ORDER BY id", (consumer.channel_id,)
    )
    return [int(r[0]) for r in rows]


async def test_async_sdk_pays_json_and_streams_with_the_costs_of_the_ledger(
    provider: Provider, open_channel: ChannelFactory
) -> None:
    consumer = await open_channel(provider)
    seen: list[dict[str, str]] = []
    client = openai.AsyncOpenAI(
        base_url=provider.url,
        api_key="drain",
        max_retries=0,
        http_client=drain_async_http_client(consumer, on_figures=seen.append),
    )
    async with client:
        answer = await client.chat.completions.create(model=DEMO_MODEL, messages=MESSAGES, max_tokens=50)
        assert answer.choices[0].message.content
        stream = await client.chat.completions.create(model=DEMO_MODEL, messages=MESSAGES, max_tokens=50, stream=True)
        text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
        assert text
        models = await client.models.list()  # not paid: untouched
        assert [m.id for m in models.data]

    costs = await ledger_costs(provider, consumer)
    assert [int(f["X-DRAIN-Cost"]) for f in seen] == costs and len(costs) == 2
    assert consumer.charged == sum(costs) == int(seen[-1]["X-DRAIN-Total"])
    assert consumer.last_cost == costs[-1] and consumer.remaining == int(seen[-1]["X-DRAIN-Remaining"])
    assert consumer.next_min == int(seen[-1]["X-DRAIN-Next-Min"])
    # Each voucher was the exact one for its body: the charged total plus its worst case.
    body = {"model": DEMO_MODEL, "messages": MESSAGES, "max_tokens": 50}
    worst = consumer.worst_case(body, DEMO_PRICE)
    second = max(costs[0] + worst, int(seen[0]["X-DRAIN-Next-Min"]))
    assert await voucher_amounts(provider, consumer) == [worst, second]


async def test_sync_sdk_pays_json_and_streams(provider: Provider, open_channel: ChannelFactory) -> None:
    consumer = await open_channel(provider)

    def calls() -> tuple[str, str]:  # the sync SDK blocks: off the event loop that serves the provider
        with openai.OpenAI(
            base_url=provider.url, api_key="drain", max_retries=0, http_client=drain_http_client(consumer)
        ) as client:
            answer = client.chat.completions.create(model=DEMO_MODEL, messages=MESSAGES, max_tokens=40)
            stream = client.chat.completions.create(model=DEMO_MODEL, messages=MESSAGES, max_tokens=40, stream=True)
            text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
            return answer.choices[0].message.content or "", text

    json_text, stream_text = await asyncio.to_thread(calls)
    assert json_text and stream_text
    costs = await ledger_costs(provider, consumer)
    assert len(costs) == 2 and consumer.charged == sum(costs) and consumer.last_cost == costs[-1]
    assert consumer.nonce == 2


async def test_concurrent_requests_sign_on_top_of_those_in_flight(
    provider: Provider, open_channel: ChannelFactory
) -> None:
    """Eight requests at once on one channel: each voucher covers those in flight (none is
    refused for funds), one that loses the race to a later nonce is signed again, and the total
    is the sum of the costs."""
    consumer = await open_channel(provider)
    signer = VoucherSigner(consumer)
    client = openai.AsyncOpenAI(
        base_url=provider.url,
        api_key="drain",
        max_retries=0,
        http_client=drain_async_http_client(consumer, signer=signer),
    )
    async with client:

        async def one(i: int) -> str:
            stream = i % 2 == 0
            if stream:
                chunks = await client.chat.completions.create(
                    model=DEMO_MODEL, messages=MESSAGES, max_tokens=30, stream=True
                )
                return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
            answer = await client.chat.completions.create(model=DEMO_MODEL, messages=MESSAGES, max_tokens=30)
            return answer.choices[0].message.content or ""

        assert all(await asyncio.gather(*(one(i) for i in range(8))))
    costs = await ledger_costs(provider, consumer)
    assert len(costs) == 8 and consumer.charged == sum(costs)
    assert signer.in_flight == 0


async def test_the_providers_own_error_reaches_the_caller(provider: Provider, open_channel: ChannelFactory) -> None:
    """A model the provider does not price: the kit signs the least voucher and the caller gets
    the provider's 400, not a client-side failure; nothing is charged."""
    consumer = await open_channel(provider)
    client = openai.AsyncOpenAI(
        base_url=provider.url, api_key="drain", max_retries=0, http_client=drain_async_http_client(consumer)
    )
    async with client:
        try:
            await client.chat.completions.create(model="no-such-model", messages=MESSAGES)
        except openai.BadRequestError as exc:
            assert exc.response.headers["X-DRAIN-Error"] == "model_not_supported"
        else:
            raise AssertionError("the provider accepted a model it does not price")
    assert await ledger_costs(provider, consumer) == []


async def test_langchain_chat_openai_pays_through_the_same_hook(
    provider: Provider, open_channel: ChannelFactory
) -> None:
    from langchain_openai import ChatOpenAI

    consumer = await open_channel(provider)
    signer = VoucherSigner(consumer)  # one count of what is in flight for both clients
    llm = ChatOpenAI(
        model=DEMO_MODEL,
        base_url=provider.url,
        api_key="drain",  # type: ignore[arg-type]
        max_retries=0,
        max_tokens=40,  # type: ignore[call-arg]
        http_client=drain_http_client(consumer, signer=signer),
        http_async_client=drain_async_http_client(consumer, signer=signer),
    )
    answer = await llm.ainvoke("Hello from LangChain")
    assert answer.content
    streamed = "".join([str(chunk.content) async for chunk in llm.astream("And a stream")])
    assert streamed
    synced = await asyncio.to_thread(llm.invoke, "And the sync client")
    assert synced.content
    costs = await ledger_costs(provider, consumer)
    assert len(costs) == 3 and consumer.charged == sum(costs) and consumer.last_cost == costs[-1]
    assert signer.in_flight == 0
