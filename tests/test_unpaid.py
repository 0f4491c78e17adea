"""Requests that pay nothing stay cheap (docs/PROTOCOL.md, "The order of the answers"):

- no token of a body is counted before its voucher is accepted, nor when a ledger read shows the
  voucher cannot pay for the least the body could count (a replay, a voucher too small);
- a large paid input is counted on the counting threads, and a small paid request is not held up
  by it; a small one is counted on the event loop;
- a Content-Length above MAX_BODY_BYTES is answered 413 before the body is sent; a body slower
  than BODY_TIMEOUT is answered 408; both close the connection;
- each address may fail payment PAYMENT_FAILURES_PER_MINUTE times, then gets 429 with
  Retry-After, whatever it sends; paid requests never count; `dev` turns the limit off;
- a forged Host header is never reflected in the discovery headers or /v1/docs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from eth_account import Account
from helpers import ChannelFactory, CountingCounter, Provider, ProviderFactory, paid_chat, wait_for

from drain_provider.api.clients import LIMITED_ANSWER_DELAY
from drain_provider.consumer import DrainConsumer
from drain_provider.devtools.demo_upstream import DEMO_MODEL
from drain_provider.devtools.dev import dev_settings
from drain_provider.devtools.devchain import DevChain
from drain_provider.logs import quiet_bad_requests
from drain_provider.protocol import sign_voucher
from drain_provider.tokens import TokenCounter

LARGE = "The quick brown fox jumps over the lazy dog. " * 5_000  # 225 kB, about 50k tokens


def chat(content: str) -> bytes:
    return json.dumps({"model": DEMO_MODEL, "messages": [{"role": "user", "content": content}]}).encode()


async def post(
    provider: Provider, body: bytes, voucher: str | None = None, forwarded_for: str | None = None
) -> tuple[int, dict[str, str], dict[str, Any]]:
    headers = {}
    if voucher is not None:
        headers["X-DRAIN-Voucher"] = voucher
    if forwarded_for is not None:
        headers["X-Forwarded-For"] = forwarded_for
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{provider.url}/chat/completions", data=body, headers=headers) as resp,
    ):
        return resp.status, dict(resp.headers), await resp.json()


async def ledger_state(provider: Provider) -> tuple[Any, ...]:
    """What a refused request must leave as it was (a channel seen for the first time may be
    stored, with nothing accepted on it)."""
    channels = await provider.ledger.fetchall(
        "SELECT channel_id, charged, reserved, last_nonce FROM channels WHERE last_nonce != '0'"
    )
    vouchers = await provider.ledger.fetchone("SELECT COUNT(*) FROM vouchers")
    usage = await provider.ledger.fetchone("SELECT COUNT(*) FROM usage")
    return (sorted(channels), vouchers, usage)


# --- no counting before payment -------------------------------------------------------------------


async def test_refused_vouchers_cost_no_counting(
    provider_factory: ProviderFactory, open_channel: ChannelFactory
) -> None:
    counter = CountingCounter()
    provider = await provider_factory(counter=counter)
    consumer = await open_channel(provider)
    stranger = sign_voucher(bytes(Account.create().key), consumer.domain, consumer.channel_id, 10**6, 1)
    unknown = sign_voucher(consumer.account.key, consumer.domain, "0x" + "cd" * 32, 10**6, 1)
    elsewhere = await open_channel(Account.create().address)
    refusals = {
        None: "voucher_required",
        "{not a voucher": "invalid_voucher_format",
        stranger.header_value(): "invalid_signature",
        unknown.header_value(): "channel_not_found",
        elsewhere.next_voucher(10**6).header_value(): "wrong_provider",
        consumer.sign(consumer.deposit + 1).header_value(): "exceeds_deposit",
    }
    for header, code in refusals.items():
        status, headers, _ = await post(provider, chat(LARGE), header)
        assert (status, headers["X-DRAIN-Error"]) == (402, code)
    assert counter.spy.encoded_bytes == 0


async def test_a_voucher_that_cannot_pay_is_refused_before_counting(
    provider_factory: ProviderFactory, open_channel: ChannelFactory
) -> None:
    counter = CountingCounter()
    provider = await provider_factory(counter=counter)
    consumer = await open_channel(provider)
    await paid_chat(provider.client(), consumer)
    counted = counter.spy.encoded_bytes
    before = await ledger_state(provider)
    replay = consumer.sign(consumer.amount + 10**6, nonce=consumer.nonce)
    status, headers, _ = await post(provider, chat(LARGE), replay.header_value())
    assert (status, headers["X-DRAIN-Error"]) == (402, "invalid_nonce")
    # One base unit, on a fresh channel: the input alone costs more, at its fewest tokens.
    consumer = await open_channel(provider)
    before = await ledger_state(provider)
    tiny = consumer.sign(1)
    status, headers, body = await post(provider, chat(LARGE), tiny.header_value())
    assert (status, headers["X-DRAIN-Error"]) == (402, "insufficient_funds")
    assert "at least" in body["error"]["message"]
    assert int(headers["X-DRAIN-Provided"]) == tiny.amount
    least = int(headers["X-DRAIN-Required"])
    assert counter.spy.encoded_bytes == counted  # neither was counted
    assert await ledger_state(provider) == before
    # The lower bound was a true one: signing it is not enough once the input is counted, and
    # the count says how much is.
    status, headers, body = await post(provider, chat(LARGE), consumer.sign(least).header_value())
    assert (status, headers["X-DRAIN-Error"]) == (402, "insufficient_funds")
    assert "at least" not in body["error"]["message"]
    required = int(headers["X-DRAIN-Required"])
    assert required > least
    assert counter.spy.encoded_bytes > counted
    status, headers, _ = await post(provider, chat(LARGE), consumer.sign(required).header_value())
    assert status == 200 and int(headers["X-DRAIN-Cost"]) > 0


async def test_large_inputs_are_counted_off_the_event_loop(
    provider_factory: ProviderFactory, open_channel: ChannelFactory
) -> None:
    counter = CountingCounter()
    provider = await provider_factory(counter=counter)
    consumer = await open_channel(provider)
    await paid_chat(provider.client(), consumer)
    assert counter.spy.threads == {threading.current_thread().name}  # a small one: on the loop
    counter.spy.threads.clear()
    status, _, answer = await post(provider, chat(LARGE), consumer.next_voucher(10**6).header_value())
    assert status == 200
    assert {name.split("_")[0] for name in counter.spy.threads} == {"counting"}
    expected = TokenCounter().count_messages(DEMO_MODEL, [{"role": "user", "content": LARGE}])
    row = await provider.ledger.fetchone("SELECT input_tokens FROM usage ORDER BY id DESC LIMIT 1")
    assert row == (expected,) and answer["usage"]["prompt_tokens"] == expected


async def test_a_small_paid_request_does_not_wait_for_a_large_count(
    provider_factory: ProviderFactory, open_channel: ChannelFactory
) -> None:
    """Two megabytes of one repeated letter take tiktoken about a second to count: a small paid
    request sent meanwhile is answered before that count is done. (The large request's voucher
    covers the least its input could count, not what it counts: it is refused once counted, so
    that the demo upstream, on this test's event loop too, never counts it again.) The count is
    made long enough that the small request, which waits its turns for the GIL with the counting
    thread, is done well before it even on a loaded machine."""
    counter = CountingCounter()
    provider = await provider_factory(counter=counter, max_body_bytes=3 * 1024 * 1024)
    large, small = await open_channel(provider), await open_channel(provider)
    slow = chat("x" * 2_000_000)  # 250,007 tokens, at least 15,640
    large_request = asyncio.create_task(post(provider, slow, large.sign(40_000).header_value()))
    await wait_for(lambda: counter.spy.encoded_bytes >= 2_000_000)  # the count has begun
    await paid_chat(provider.client(), small)
    assert not large_request.done()
    status, headers, _ = await large_request
    assert (status, headers["X-DRAIN-Error"]) == (402, "insufficient_funds")


# --- size and time ------------------------------------------------------------------------------


@dataclass
class RawAnswer:
    status: int
    headers: dict[str, str]
    body: bytes
    closed: bool  # the server ended the connection after the answer


async def raw_exchange(
    provider: Provider, head: bytes, body: bytes = b"", wait_close: float = 2.0, body_after: float = 0.0
) -> RawAnswer:
    """Send `head` and `body` as they are on a new connection (the body `body_after` seconds
    after the head, if set); read one answer, then see whether the server closes the connection
    within `wait_close` seconds."""
    server = provider.server
    assert server.host is not None and server.port is not None
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(head)
        if body_after:
            await writer.drain()
            await asyncio.sleep(body_after)
        writer.write(body)
        await writer.drain()
        raw_head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        status_line, *lines = raw_head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines if line)}
        content = await reader.readexactly(int(headers.get("content-length", "0")))
        try:
            closed = await asyncio.wait_for(reader.read(1), wait_close) == b""
        except TimeoutError:
            closed = False
        return RawAnswer(int(status_line.split()[1]), headers, content, closed)
    finally:
        writer.close()


def request_head(path: str, **headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: localhost", *(f"{k.replace('_', '-')}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def test_declared_oversize_is_refused_before_the_body_is_sent(provider: Provider) -> None:
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/admin/claim", "/v1/nope"):
        head = request_head(path, Content_Length=str(10**12), Content_Type="application/json")
        answer = await raw_exchange(provider, head)  # and not a byte of the body
        assert answer.status == 413 and answer.headers["x-drain-error"] == "request_too_large"
        assert json.loads(answer.body)["error"]["code"] == "request_too_large"
        assert answer.headers["connection"] == "close" and answer.closed


async def test_a_refused_voucher_is_answered_before_the_body_is_read(provider: Provider) -> None:
    """No voucher, or one that cannot pay on any channel of ours: the 402 comes without a byte of
    the body read (and the connection is closed, the body still on its way)."""
    for voucher in (None, '{"channelId": "0x' + "ab" * 32 + '", "amount": "1", "nonce": "1", "signature": "0x00"}'):
        extra = {} if voucher is None else {"X_DRAIN_Voucher": voucher}
        head = request_head("/v1/chat/completions", Content_Length="500000", Content_Type="application/json", **extra)
        answer = await raw_exchange(provider, head)  # and not a byte of the body
        assert answer.status == 402, answer
        assert answer.headers["x-drain-error"] in ("voucher_required", "invalid_voucher_format")
        assert answer.headers["connection"] == "close" and answer.closed


async def test_a_chunked_body_past_the_limit_is_413(
    provider_factory: ProviderFactory, open_channel: ChannelFactory
) -> None:
    provider = await provider_factory(max_body_bytes=4096)
    voucher = (await open_channel(provider)).next_voucher(10**5).header_value()
    chunk = b"x" * 1000
    head = request_head("/v1/chat/completions", Transfer_Encoding="chunked", X_DRAIN_Voucher=voucher)
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(5)) + b"0\r\n\r\n"
    answer = await raw_exchange(provider, head, body)
    assert answer.status == 413 and answer.headers["x-drain-error"] == "request_too_large"
    assert answer.closed


async def test_a_slow_body_is_408_and_the_connection_closed(
    provider_factory: ProviderFactory, open_channel: ChannelFactory
) -> None:
    provider = await provider_factory(body_timeout=0.3)
    voucher = (await open_channel(provider)).next_voucher(10**5).header_value()
    head = request_head(
        "/v1/chat/completions", Content_Length="100", Content_Type="application/json", X_DRAIN_Voucher=voucher
    )
    answer = await raw_exchange(provider, head, b"{")  # 1 of the 100 bytes it declared
    assert answer.status == 408 and answer.headers["x-drain-error"] == "request_timeout"
    assert json.loads(answer.body)["error"]["code"] == "request_timeout"
    assert answer.closed


@pytest.mark.parametrize("body_after", [0.0, 0.1], ids=["with-head", "after-head"])
async def test_a_body_that_cannot_be_decoded_is_400(
    provider: Provider, open_channel: ChannelFactory, caplog: pytest.LogCaptureFixture, body_after: float
) -> None:
    """A Content-Encoding the body does not match is the client's error: 400, never a 500 nor an
    ERROR line. aiohttp's parser refuses it itself when the body comes with the head (plain
    text); when it comes while the handler reads, the answer is ours."""
    quiet_bad_requests()  # as the serving loop does
    voucher = (await open_channel(provider)).next_voucher(10**5).header_value()
    for encoding in ("gzip", "deflate", "br"):
        body = b"this is not compressed at all"
        head = request_head(
            "/v1/chat/completions",
            Content_Length=str(len(body)),
            Content_Type="application/json",
            Content_Encoding=encoding,
            X_DRAIN_Voucher=voucher,
        )
        answer = await raw_exchange(provider, head, body, body_after=body_after)
        assert answer.status == 400, encoding
        if "x-drain-error" in answer.headers:
            assert answer.headers["x-drain-error"] == "invalid_request"
            assert "could not be decoded" in json.loads(answer.body)["error"]["message"]
        elif body_after and encoding != "br":  # br: refused at the head when brotli is not installed
            raise AssertionError(f"{encoding}: the handler's own read must answer with our error body")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_expect_headers_are_answered_by_us(provider: Provider, caplog: pytest.LogCaptureFixture) -> None:
    """100-continue for a body that would be read; a 413 instead of the 100 for one declared too
    large; any other expectation (not UTF-8 either) a 417 with our error body, never a 500."""
    quiet_bad_requests()
    too_big = request_head("/v1/chat/completions", Content_Length=str(10**9), Expect="100-continue")
    answer = await raw_exchange(provider, too_big)
    assert answer.status == 413 and answer.headers["x-drain-error"] == "request_too_large"
    for path in ("/v1/chat/completions", "/v1/models", "/v1/admin/stats", "/health"):
        head = request_head(path, Content_Length="2").replace(b"\r\n\r\n", b"\r\nExpect: \xff\xfe\r\n\r\n")
        answer = await raw_exchange(provider, head, b"{}")
        assert answer.status == 417 and answer.headers["x-drain-error"] == "expectation_failed", path
    head = request_head("/v1/chat/completions", Content_Length="2", Expect="100-continue")
    answer = await raw_exchange(provider, head, b"{}", body_after=0.2)
    assert answer.status == 100  # then the answer to the request itself
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# --- the limit on failed payments -------------------------------------------------------------


async def test_failed_payments_are_limited_per_address(
    provider_factory: ProviderFactory, open_channel: ChannelFactory
) -> None:
    provider = await provider_factory(payment_failures_per_minute=3)
    consumer = await open_channel(provider)
    assert (await post(provider, chat("hi")))[0] == 402  # no voucher
    assert (await post(provider, b"{not json", consumer.next_voucher(10**5).header_value()))[0] == 400
    assert (await post(provider, chat("hi"), "{bad"))[0] == 402
    before = await ledger_state(provider)
    asked = time.monotonic()
    status, headers, body = await post(provider, chat("hi"))
    assert time.monotonic() - asked >= LIMITED_ANSWER_DELAY  # a client that does not wait is made to
    assert (status, headers["X-DRAIN-Error"], body["error"]["code"]) == (429, "rate_limited", "rate_limited")
    assert headers["Retry-After"] == "20"  # three a minute: one every 20 s
    # Over the limit even a good voucher is not looked at.
    status, headers, _ = await post(provider, chat("hi"), consumer.next_voucher(10**5).header_value())
    assert status == 429
    assert await ledger_state(provider) == before
    # Another client, behind a trusted proxy (loopback, by default), has its own limit.
    status, headers, _ = await post(provider, chat("hi"), forwarded_for="198.51.100.7")
    assert (status, headers["X-DRAIN-Error"]) == (402, "voucher_required")


async def test_paid_requests_never_count(provider_factory: ProviderFactory, open_channel: ChannelFactory) -> None:
    provider = await provider_factory(payment_failures_per_minute=2)
    consumer = await open_channel(provider)
    client = provider.client()
    assert (await post(provider, chat("hi")))[0] == 402
    for _ in range(5):
        await paid_chat(client, consumer)
    assert (await post(provider, chat("hi")))[0] == 402
    assert (await post(provider, chat("hi")))[0] == 429


async def test_the_limit_can_be_off(provider_factory: ProviderFactory) -> None:
    provider = await provider_factory(payment_failures_per_minute=0)
    for _ in range(10):
        assert (await post(provider, chat("hi")))[0] == 402


def test_dev_turns_the_limit_off(chain: DevChain, tmp_path: Path) -> None:
    settings = dev_settings(
        {"DATABASE_PATH": str(tmp_path / "dev.db")}, chain, bytes(Account.create().key), "http://127.0.0.1:9/v1"
    )
    assert settings.payment_failures_per_minute == 0


# --- the Host header ----------------------------------------------------------------------------


async def discovery(provider: Provider, host: str) -> tuple[dict[str, str], str]:
    """The 402 discovery headers and /v1/docs as a client naming `host` in Host gets them."""
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{provider.url}/chat/completions", data=chat("hi"), headers={"Host": host}) as resp:
            assert resp.status == 402
            headers = {k: v for k, v in resp.headers.items() if k.startswith("X-Payment-")}
        async with session.get(f"{provider.url}/docs", headers={"Host": host}) as resp:
            return headers, await resp.text()


async def test_a_forged_host_is_not_reflected(provider: Provider) -> None:
    bound = f"http://127.0.0.1:{provider.server.port}"
    for forged in ("evil.example", "evil.example:80", "127.0.0.1.evil.example", "localhost@evil.example"):
        headers, docs = await discovery(provider, forged)
        assert headers["X-Payment-Docs"] == f"{bound}/v1/docs"
        assert headers["X-Payment-Signing"] == f"{bound}/v1/signing"
        assert "evil" not in docs and f"{bound}/v1/chat/completions" in docs


async def test_an_allowed_host_is_used(provider_factory: ProviderFactory) -> None:
    provider = await provider_factory()
    headers, docs = await discovery(provider, "LOCALHOST:8443")
    assert headers["X-Payment-Docs"] == "http://localhost:8443/v1/docs" and "http://localhost:8443/v1/" in docs
    configured = await provider_factory(allowed_hosts=("api.example.com",))
    headers, _ = await discovery(configured, "api.example.com")
    assert headers["X-Payment-Signing"] == "http://api.example.com/v1/signing"
    headers, _ = await discovery(configured, "localhost")
    assert headers["X-Payment-Signing"] == f"http://127.0.0.1:{configured.server.port}/v1/signing"
    public = await provider_factory(public_url="https://llm.example.com")
    headers, docs = await discovery(public, "evil.example")
    assert headers["X-Payment-Docs"] == "https://llm.example.com/v1/docs" and "evil" not in docs


async def test_consumer_is_unaffected(provider: Provider, open_channel: ChannelFactory) -> None:
    """DrainConsumer.voucher_for counts as the provider does, with the input counted on demand."""
    consumer: DrainConsumer = await open_channel(provider)
    body = {"model": DEMO_MODEL, "messages": [{"role": "user", "content": LARGE}], "max_tokens": 10}
    voucher = consumer.voucher_for(body, provider.settings.prices[DEMO_MODEL])
    status, _, _ = await post(provider, json.dumps(body).encode(), voucher.header_value())
    assert status == 200
