"""GET /v1/channels/{id} and /v1/channels/{id}/usage: where a channel stands, figures against the
ledger; a client that lost its state continues from them; the usage history, paged, for the
consumer's signature only."""

from __future__ import annotations

import json
import time
from typing import Any

import openai
import pytest
from eth_account import Account
from eth_utils.address import is_checksum_address
from helpers import DEMO_PRICE, USDC, ChannelFactory, Provider, call, consumer_request, paid_chat

from drain_provider.consumer import DrainConsumer
from drain_provider.devtools.demo_upstream import DEMO_MODEL
from drain_provider.pricing import cost


async def status_of(provider: Provider, channel_id: str) -> tuple[int, Any]:
    status, body, headers = await call(provider, "GET", f"/channels/{channel_id}")
    if status == 200:
        assert headers["Cache-Control"] == "no-store"
    return status, body


async def usage_of(provider: Provider, channel_id: str, **params: Any) -> tuple[int, Any]:
    status, body, _ = await call(provider, "GET", f"/channels/{channel_id}/usage", params=params)
    return status, body


async def test_the_status_shows_the_ledger(provider: Provider, open_channel: ChannelFactory) -> None:
    consumer = await open_channel(provider, deposit=3 * USDC)
    status, body = await status_of(provider, consumer.channel_id)  # new to the ledger: read from chain
    assert status == 200
    assert body["status"] == "open" and body["charged"] == "0" and body["lastVoucher"] is None
    assert body["next"] == {"nonce": "1", "minAmount": "0"}
    for _ in range(3):
        await paid_chat(provider.client(), consumer, budget=2_000)
    record = await provider.ledger.get_channel(consumer.channel_id)
    assert record is not None
    status, body = await status_of(provider, consumer.channel_id)
    assert body == {
        "channelId": consumer.channel_id,
        "chainId": provider.settings.chain_id,
        "contract": provider.settings.drain_contract,
        "contractVersion": "v2",
        "consumer": consumer.address,
        "provider": provider.address,
        "status": "open",
        "deposit": str(3 * USDC),
        "charged": str(record.charged),
        "reserved": "0",
        "claimed": "0",
        "remaining": str(3 * USDC - record.charged),
        "expiry": record.expiry,
        "lastVoucher": {"nonce": "3", "amount": str(consumer.amount)},
        "next": {"nonce": "4", "minAmount": str(consumer.amount)},
        "closeAuthorization": None,
    }
    assert all(is_checksum_address(body[key]) for key in ("contract", "consumer", "provider"))
    assert record.charged == consumer.charged and record.last_amount == consumer.amount

    (claim,) = await provider.claimer.cycle(force=True)
    _, close, _ = await call(
        provider, "POST", "/close-channel", data=json.dumps({"channelId": consumer.channel_id}).encode()
    )
    status, body = await status_of(provider, consumer.channel_id)
    assert (body["status"], body["claimed"]) == ("closing", str(claim.amount))
    assert body["closeAuthorization"] == {"finalAmount": close["finalAmount"], "signature": close["signature"]}


async def test_a_client_that_lost_its_state_continues_from_the_status(
    provider: Provider, open_channel: ChannelFactory
) -> None:
    consumer = await open_channel(provider)
    client = provider.client()
    for _ in range(2):
        await paid_chat(client, consumer, budget=3_000)
    # The client restarts with nothing but its key and channel id.
    fresh = DrainConsumer(consumer.account, consumer.domain, consumer.channel_id, consumer.deposit)
    with pytest.raises(openai.APIStatusError) as refused:
        await paid_chat(client, fresh, budget=3_000)  # nonce 1 again
    assert refused.value.response.headers["X-DRAIN-Error"] == "invalid_nonce"
    _, body = await status_of(provider, consumer.channel_id)
    content = "Where was I?"
    max_tokens = 40
    worst_case = cost(DEMO_PRICE, 50, max_tokens)  # more than its input's few tokens, plus max_tokens
    voucher = fresh.sign(int(body["next"]["minAmount"]) + worst_case, int(body["next"]["nonce"]))
    raw = await client.chat.completions.with_raw_response.create(
        model=DEMO_MODEL,
        messages=[{"role": "user", "content": content}],
        max_tokens=max_tokens,
        extra_headers={"X-DRAIN-Voucher": voucher.header_value()},
    )
    assert raw.parse().choices[0].message.content
    assert int(raw.headers["X-DRAIN-Total"]) == int(body["charged"]) + int(raw.headers["X-DRAIN-Cost"])


async def test_unknown_and_bad_channel_ids(provider: Provider, open_channel: ChannelFactory) -> None:
    other = await open_channel(Account.create().address)  # another provider's
    for channel_id in ["0x" + "ab" * 32, other.channel_id]:
        assert (await status_of(provider, channel_id))[1]["error"]["code"] == "channel_not_found"
        assert (await status_of(provider, channel_id))[0] == 404
    for channel_id in ["0x12", "ab" * 32, "0x" + "zz" * 32, "0x" + "ab" * 33, "%ff"]:
        status, body = await status_of(provider, channel_id)
        assert (status, body["error"]["code"]) == (400, "invalid_request"), channel_id
        status, body = await usage_of(provider, channel_id, **consumer_request(other, "usage"))
        assert (status, body["error"]["code"]) == (400, "invalid_request"), channel_id
    assert await provider.ledger.fetchone("SELECT COUNT(*) FROM channels") == (0,)


async def test_usage_pages_newest_first(provider: Provider, open_channel: ChannelFactory) -> None:
    consumer = await open_channel(provider)
    headers = [await paid_chat(provider.client(), consumer, budget=1_000 + i) for i in range(5)]
    pages, before = [], None
    while True:
        params = {**consumer_request(consumer, "usage"), "limit": 2}
        if before is not None:
            params["before"] = before
        status, body = await usage_of(provider, consumer.channel_id, **params)
        assert status == 200 and body["channelId"] == consumer.channel_id
        pages.append(body["items"])
        before = body["nextBefore"]
        if before is None:
            break
    assert [len(page) for page in pages] == [2, 2, 1]
    items = [item for page in pages for item in page]
    assert [int(item["nonce"]) for item in items] == [5, 4, 3, 2, 1]
    assert [item["cost"] for item in items] == [raw.headers["X-DRAIN-Cost"] for raw in reversed(headers)]
    assert sum(int(item["cost"]) for item in items) == consumer.charged
    first = items[-1]
    assert first["endpoint"] == "/chat/completions" and first["model"] == DEMO_MODEL and first["status"] == "ok"
    assert first["inputTokens"] > 0 and first["outputTokens"] > 0 and abs(first["createdAt"] - time.time()) < 60
    assert first["voucherAmount"] == "1000"
    status, body = await usage_of(provider, consumer.channel_id, **consumer_request(consumer, "usage"))
    assert len(body["items"]) == 5 and body["nextBefore"] is None  # the default limit, 100


async def test_usage_needs_the_consumers_signature(provider: Provider, open_channel: ChannelFactory) -> None:
    consumer = await open_channel(provider)
    await paid_chat(provider.client(), consumer)
    channel = consumer.channel_id
    status, body = await usage_of(provider, channel)
    assert (status, body["error"]["code"]) == (401, "consumer_signature_required")
    now = int(time.time())
    refused = {
        "a close signature": consumer_request(consumer, "close"),
        "wrong signer": consumer_request(consumer, "usage", key=bytes(Account.create().key)),
        "stale": consumer_request(consumer, "usage", timestamp=now - 400),
        "timestamp only": {"timestamp": now},
        "bad signature": {"timestamp": now, "signature": "0x" + "00" * 65},
        "signature not hex": {"timestamp": now, "signature": "0x" + "zz" * 65},
    }
    for case, params in refused.items():
        status, body = await usage_of(provider, channel, **params)
        assert (status, body["error"]["code"]) == (401, "invalid_consumer_signature"), case
    bad_paging: list[dict[str, Any]] = [
        {"limit": 0},
        {"limit": 501},
        {"limit": "ten"},
        {"before": "-1"},
        {"before": "9" * 30},
    ]
    for paging in bad_paging:
        status, body = await usage_of(provider, channel, **consumer_request(consumer, "usage"), **paging)
        assert (status, body["error"]["code"]) == (400, "invalid_request"), paging
    status, body = await usage_of(provider, channel, **consumer_request(consumer, "usage"), limit=500)
    assert status == 200 and len(body["items"]) == 1
