"""The access log: one line per request, refusals and streams included, with its request id, and
nothing a client's header or a secret could slip into it."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

import aiohttp
import pytest
from helpers import ChannelFactory, Provider, ProviderFactory

from drain_provider.devtools.demo_upstream import DEMO_MODEL

CHAT = {"model": DEMO_MODEL, "messages": [{"role": "user", "content": "Hello"}]}


def access_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "drain_provider.access"]


def field(line: str, name: str) -> str:
    match = re.search(rf"(?:^| ){name}=(\S+)", line)
    assert match, (name, line)
    return match.group(1)


async def post(
    provider: Provider, path: str, headers: Mapping[str, str], json: object = CHAT
) -> tuple[int, Mapping[str, str], str]:
    async with aiohttp.ClientSession() as session, session.post(provider.url + path, json=json, headers=headers) as r:
        return r.status, r.headers, await r.text()


@pytest.fixture(autouse=True)
def _info(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="drain_provider.access")


async def test_a_paid_request_is_one_line_joined_to_its_usage_row(
    provider: Provider, open_channel: ChannelFactory, caplog: pytest.LogCaptureFixture
) -> None:
    consumer = await open_channel(provider)
    voucher = consumer.next_voucher(100_000).header_value()
    status, headers, _ = await post(
        provider, "/chat/completions", {"X-DRAIN-Voucher": voucher, "X-Request-Id": "client-id.42"}
    )
    assert status == 200
    assert headers["X-Request-Id"] == "client-id.42"
    assert headers["Access-Control-Expose-Headers"].endswith("X-Request-Id")  # a browser page may read it
    [line] = access_lines(caplog)
    row = await provider.ledger.fetchone("SELECT request_id, cost, input_tokens, output_tokens, channel_id FROM usage")
    assert row is not None
    assert line.startswith("access request_id=client-id.42 method=POST route=/v1/chat/completions status=200 code=none")
    assert (field(line, "request_id"), int(field(line, "cost")), int(field(line, "in")), int(field(line, "out"))) == (
        row[0],
        row[1],
        row[2],
        row[3],
    )
    assert field(line, "channel") == row[4] == consumer.channel_id
    assert field(line, "model") == DEMO_MODEL and field(line, "client") == "127.0.0.1"
    assert field(line, "ending") == "done"
    assert float(field(line, "ms")) > 0


@pytest.mark.parametrize("sent", ["has space", 'quote"d', "x" * 129, "new\\nline", "ünïcode", "a=b c=d", "semi;colon"])
async def test_a_bad_request_id_is_replaced_not_reflected(
    provider: Provider, caplog: pytest.LogCaptureFixture, sent: str
) -> None:
    status, headers, _ = await post(provider, "/chat/completions", {"X-Request-Id": sent})
    assert status == 402
    assert re.fullmatch(r"[0-9a-f]{16}", headers["X-Request-Id"])
    [line] = access_lines(caplog)
    assert sent not in line and field(line, "request_id") == headers["X-Request-Id"]


async def test_refusals_errors_and_unknown_routes_are_logged_without_secrets(
    provider: Provider, open_channel: ChannelFactory, caplog: pytest.LogCaptureFixture
) -> None:
    consumer = await open_channel(provider)
    voucher = consumer.next_voucher(1).header_value()
    secret_headers = {"X-DRAIN-Voucher": voucher, "Authorization": "Bearer sk-secret-token-123456"}
    answers = [
        await post(provider, "/chat/completions", secret_headers),  # 402: too little
        await post(provider, "/chat/completions", {"X-DRAIN-Voucher": "0xnot-a-voucher"}),
        await post(provider, "/no/such/thing?api_key=QUERYSECRET", {}),
        await post(provider, "/chat/completions", {}, json={"model": 1}),  # no voucher: refused first
    ]
    statuses = [(status, headers.get("X-DRAIN-Error")) for status, headers, _ in answers]
    assert statuses == [
        (402, "insufficient_funds"),
        (402, "invalid_voucher_format"),
        (404, "not_found"),
        (402, "voucher_required"),
    ]
    lines = access_lines(caplog)
    assert [(int(field(line, "status")), field(line, "code")) for line in lines] == statuses
    assert [field(line, "route") for line in lines] == ["/v1/chat/completions"] * 2 + ["unmatched"] + [
        "/v1/chat/completions"
    ]
    assert all(headers["X-Request-Id"] for _, headers, _ in answers)
    assert field(lines[0], "channel") == consumer.channel_id
    signature = voucher.split('"signature":"')[-1][:40] if '"signature"' in voucher else voucher[-40:]
    for secret in ("sk-secret-token", "QUERYSECRET", signature, "no/such"):
        assert secret not in caplog.text


async def test_a_stream_is_logged_when_it_ends(
    provider: Provider, open_channel: ChannelFactory, caplog: pytest.LogCaptureFixture
) -> None:
    consumer = await open_channel(provider)
    voucher = consumer.next_voucher(100_000)
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            provider.url + "/chat/completions",
            json={**CHAT, "stream": True},
            headers={"X-DRAIN-Voucher": voucher.header_value(), "X-Request-Id": "stream-1"},
        ) as resp,
    ):
        assert resp.headers["X-Request-Id"] == "stream-1"
        await resp.content.readline()
        assert access_lines(caplog) == []  # not before it ends
        text = await resp.text()
    assert text.endswith("data: [DONE]\n\n")
    [line] = access_lines(caplog)
    assert field(line, "status") == "200" and field(line, "ending") == "done" and int(field(line, "out")) > 0


async def test_rate_limited_requests_are_logged(
    provider_factory: ProviderFactory, caplog: pytest.LogCaptureFixture
) -> None:
    provider = await provider_factory(payment_failures_per_minute=1)
    for _ in range(2):
        await post(provider, "/chat/completions", {})
    assert [field(line, "code") for line in access_lines(caplog)] == ["voucher_required", "rate_limited"]
    assert field(access_lines(caplog)[-1], "status") == "429"
