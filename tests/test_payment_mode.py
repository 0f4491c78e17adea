"""PAYMENT_MODE shadow and off (the rollout modes): what is served, what is charged, how loud.

enforce is the rest of the suite. Here: shadow charges a valid voucher exactly as enforce does
and serves a refused one free (logged, counted, the channel's books untouched); off reads no
voucher and leaves the ledger alone; both still bound and meter what they relay, stream cleanly,
refuse bad bodies, and say so in the log at start, in /health and in /metrics.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import aiohttp
import pytest
from helpers import DEMO_PRICE, ChannelFactory, Provider, ProviderFactory, Upstream, paid_chat
from prometheus_client.parser import text_string_to_metric_families

from drain_provider.api.state import METRICS
from drain_provider.devtools.demo_upstream import DEMO_MODEL
from drain_provider.pricing import cost
from drain_provider.states import PaymentMode

CHAT = {"model": DEMO_MODEL, "messages": [{"role": "user", "content": "Hello there"}]}


async def post(provider: Provider, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, Any, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{provider.url}/chat/completions", json=body, headers=headers or {}) as resp,
    ):
        return resp.status, resp.headers, await resp.text()


async def health(provider: Provider) -> Any:
    async with aiohttp.ClientSession() as session, session.get(str(provider.server.make_url("/health"))) as resp:
        return await resp.json()


def scraped(provider: Provider) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = provider.app[METRICS].render().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def ledger_rows(provider: Provider) -> tuple[int, int, int]:
    row = await provider.ledger.fetchone(
        "SELECT (SELECT COUNT(*) FROM usage), (SELECT COUNT(*) FROM vouchers), (SELECT COUNT(*) FROM channels)"
    )
    assert row is not None
    return row[0], row[1], row[2]


@pytest.fixture
async def shadow(provider_factory: ProviderFactory) -> Provider:
    return await provider_factory(payment_mode=PaymentMode.SHADOW, payment_failures_per_minute=1)


async def test_shadow_serves_a_request_without_voucher_logs_and_counts_it(
    shadow: Provider, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="drain_provider.payments")
    for _ in range(3):  # more than PAYMENT_FAILURES_PER_MINUTE: a refusal served is not counted as one
        status, headers, text = await post(shadow, CHAT, {"X-Request-Id": "shadow-req-1"})
        assert status == 200, text
        assert json.loads(text)["choices"][0]["message"]["content"]
        assert "X-DRAIN-Cost" not in headers and "X-DRAIN-Channel" not in headers
    lines = [r.getMessage() for r in caplog.records if "payment_refusal_shadowed" in r.getMessage()]
    assert (
        lines
        == ["payment_refusal_shadowed code=voucher_required route=/v1/chat/completions request_id=shadow-req-1"] * 3
    )
    assert all(r.levelno == logging.WARNING for r in caplog.records if "shadowed" in r.getMessage())
    assert scraped(shadow)[("drain_payment_refusals_shadowed_total", (("code", "voucher_required"),))] == 3
    assert await ledger_rows(shadow) == (0, 0, 0)


async def test_shadow_charges_a_valid_voucher_as_enforce_does(shadow: Provider, open_channel: ChannelFactory) -> None:
    consumer = await open_channel(shadow)
    raw = await paid_chat(shadow.client(), consumer)
    row = await shadow.ledger.fetchone("SELECT input_tokens, output_tokens, cost, status FROM usage")
    assert row is not None
    assert int(raw.headers["X-DRAIN-Cost"]) == row[2] == cost(DEMO_PRICE, row[0], row[1]) > 0
    assert row[3] == "ok"
    record = await shadow.ledger.get_channel(consumer.channel_id)
    assert record is not None and record.charged == row[2] and record.reserved == 0
    assert raw.headers["X-DRAIN-Channel"] == consumer.channel_id
    assert scraped(shadow).get(("drain_payment_refusals_shadowed_total", ())) is None


async def test_shadow_serves_insufficient_funds_without_touching_the_channel(
    shadow: Provider, open_channel: ChannelFactory, caplog: pytest.LogCaptureFixture
) -> None:
    consumer = await open_channel(shadow)
    await paid_chat(shadow.client(), consumer, budget=100)  # the channel's headroom: what is left of 100
    before = await shadow.ledger.get_channel(consumer.channel_id)
    assert before is not None and before.charged > 0
    voucher = consumer.next_voucher(1)  # the same amount, the next nonce: short of a request
    status, headers, text = await post(shadow, CHAT, {"X-DRAIN-Voucher": voucher.header_value()})
    assert status == 200, text
    assert "X-DRAIN-Cost" not in headers
    after = await shadow.ledger.get_channel(consumer.channel_id)
    assert after is not None
    assert (after.charged, after.reserved, after.last_nonce, after.last_amount) == (
        before.charged,
        0,
        before.last_nonce,
        before.last_amount,
    )
    assert (await ledger_rows(shadow))[0] == 1  # the first request's row only
    assert "payment_refusal_shadowed code=insufficient_funds" in caplog.text
    metrics = scraped(shadow)
    assert metrics[("drain_payment_refusals_shadowed_total", (("code", "insufficient_funds"),))] == 1
    assert metrics[("drain_reservations_held", ())] == 0


async def test_shadow_still_refuses_a_bad_body(shadow: Provider) -> None:
    status, headers, _ = await post(shadow, {"model": DEMO_MODEL, "messages": "not a list"})
    assert (status, headers["X-DRAIN-Error"]) == (400, "invalid_request")


@pytest.mark.parametrize("mode", [PaymentMode.SHADOW, PaymentMode.OFF])
async def test_a_free_stream_is_relayed_bounded_and_ends_cleanly(
    provider_factory: ProviderFactory, upstream: Upstream, mode: PaymentMode
) -> None:
    provider = await provider_factory(payment_mode=mode)
    body = {**CHAT, "stream": True, "max_tokens": 5}
    status, headers, text = await post(provider, body, {"X-DRAIN-Voucher": "garbage"})
    assert status == 200
    assert headers["Content-Type"].startswith("text/event-stream")
    assert text.endswith("data: [DONE]\n\n")
    assert "X-DRAIN-" not in text  # no figures: nothing was charged
    assert upstream.stats.requests[-1]["max_tokens"] == 5  # the request's own bound is passed on
    # An upstream that ignores max_tokens is cut where the request's own bound ends.
    body["messages"] = [{"role": "user", "content": '!demo {"ignore_max_tokens": true}'}]
    status, _, text = await post(provider, body)
    assert status == 200 and text.endswith("data: [DONE]\n\n")
    assert '"finish_reason":"length"' in text.replace(" ", "")
    assert await ledger_rows(provider) == (0, 0, 0)
    metrics = scraped(provider)
    assert metrics[("drain_output_tokens_total", (("model", DEMO_MODEL),))] <= 10
    assert metrics[("drain_active_streams", ())] == 0


async def test_off_serves_without_a_voucher_and_leaves_the_ledger_alone(
    provider_factory: ProviderFactory, open_channel: ChannelFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    provider = await provider_factory(payment_mode=PaymentMode.OFF)
    assert "payment_not_enforced mode=off shadowed=0" in caplog.text  # loud at start
    status, _, text = await post(provider, CHAT)
    assert status == 200, text
    consumer = await open_channel(provider)
    raw = await paid_chat(provider.client(), consumer)  # a voucher is not even looked at
    assert "X-DRAIN-Cost" not in raw.headers
    assert await ledger_rows(provider) == (0, 0, 0)
    tokens = json.loads(text)["usage"]["prompt_tokens"] + raw.parse().usage.prompt_tokens
    metrics = scraped(provider)
    assert metrics[("drain_input_tokens_total", (("model", DEMO_MODEL),))] == tokens
    assert metrics.get(("drain_revenue_base_units_total", (("model", DEMO_MODEL),))) is None
    assert metrics[("drain_payment_mode", (("mode", "off"),))] == 1
    assert metrics[("drain_payment_mode", (("mode", "enforce"),))] == 0
    access = [r.getMessage() for r in caplog.records if r.name == "drain_provider.access"]
    assert any(f"model={DEMO_MODEL}" in line and "free=true" in line and " cost=" not in line for line in access)
    answer = await health(provider)
    assert answer["paymentMode"] == "off"
    assert "payment_not_enforced" in [alert["code"] for alert in answer["alerts"]]


async def test_shadow_is_an_alert_in_health(shadow: Provider) -> None:
    await post(shadow, CHAT)
    answer = await health(shadow)
    assert answer["paymentMode"] == "shadow"
    alert = next(a for a in answer["alerts"] if a["code"] == "payment_not_enforced")
    assert "(1 since the start)" in alert["message"]


async def test_enforce_has_no_payment_alert(provider: Provider) -> None:
    answer = await health(provider)
    assert answer["paymentMode"] == "enforce"
    assert "payment_not_enforced" not in [alert["code"] for alert in answer["alerts"]]
