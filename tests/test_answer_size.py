"""MAX_ANSWER_BYTES: no upstream answer is read, held or relayed past it, however large.

The upstream here is a small aiohttp server speaking the OpenAI wire format, whose answers are
50 MB, generated lazily as they are written: it counts the bytes it managed to write, so a test
can tell that the provider stopped reading long before the end (and so never held it all)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from helpers import ChannelFactory, Provider, ProviderFactory, paid_chat

from drain_provider.api.state import COUNTER

ANSWER_BYTES = 50 * 1024 * 1024
PIECE = " word" * 1638  # about 8 KiB of text, cheap to count
CAP = 1024 * 1024  # the provider's MAX_ANSWER_BYTES in these tests
# The most the upstream can write beyond what the provider read: the sockets' buffers on both
# sides of the loopback connection, and aiohttp's read buffer. Far below the answer's 50 MB.
IN_FLIGHT = 16 * 1024 * 1024
HEAD = {"id": "chatcmpl-huge", "created": 1, "model": "demo", "system_fingerprint": "fp_huge"}


@dataclass
class HugeUpstream:
    """What the upstream is asked to send, and what it managed to."""

    shape: str = "json"  # json, json_with_length, events, one_event
    written: int = 0
    finished: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)
    release_body: asyncio.Event = field(default_factory=asyncio.Event)
    server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("/v1"))

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        stream = bool(body.get("stream"))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream" if stream else "application/json"})
        pieces = self._events() if stream else self._json()
        if self.shape == "json_with_length":
            response.content_length = ANSWER_BYTES + 1024  # close enough: it is never read to the end
        try:
            await response.prepare(request)  # the headers leave now
            if self.shape == "json_with_length":
                await self.release_body.wait()
            for piece in pieces:
                await response.write(piece)
                self.written += len(piece)
            await response.write_eof()
            self.finished = True
        finally:  # a reset connection, or the handler cancelled: the provider hung up
            self.done.set()
        return response

    def _json(self) -> Iterator[bytes]:
        """A chat.completion whose content is 50 MB, in 8 KiB writes."""
        yield b'{"id": "chatcmpl-huge", "object": "chat.completion", "created": 1, "model": "demo", '
        yield b'"choices": [{"index": 0, "message": {"role": "assistant", "content": "'
        for _ in range(ANSWER_BYTES // len(PIECE)):
            yield PIECE.encode()
        yield b'"}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}'

    def _events(self) -> Iterator[bytes]:
        """A chat stream: the role chunk, then 50 MB of content, as 8 KiB events or as one."""
        role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        yield _event({**HEAD, "object": "chat.completion.chunk", "choices": [role]})
        if self.shape == "one_event":
            yield b'data: {"id": "chatcmpl-huge", "choices": [{"index": 0, "delta": {"content": "'
            for _ in range(ANSWER_BYTES // len(PIECE)):
                yield PIECE.encode()
            return
        for _ in range(ANSWER_BYTES // len(PIECE)):
            choice = {"index": 0, "delta": {"content": PIECE}, "finish_reason": None}
            yield _event({**HEAD, "object": "chat.completion.chunk", "choices": [choice]})
        yield b"data: [DONE]\n\n"


def _event(chunk: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


@pytest.fixture
async def huge(aiohttp_server: Any) -> HugeUpstream:
    upstream = HugeUpstream()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", upstream.handle)
    upstream.server = await aiohttp_server(app)
    return upstream


@pytest.fixture
async def provider(provider_factory: ProviderFactory, huge: HugeUpstream) -> Provider:
    return await provider_factory(upstream_base_url=huge.url, max_answer_bytes=CAP)


async def usage_row(provider: Provider) -> tuple[Any, ...]:
    row = await provider.ledger.fetchone("SELECT status, output_tokens, cost FROM usage")
    assert row is not None
    return row


async def charged(provider: Provider, channel_id: str) -> int:
    record = await provider.ledger.get_channel(channel_id)
    assert record is not None and record.reserved == 0
    return record.charged


@pytest.mark.rule(3)
async def test_a_json_answer_past_the_cap_is_refused_unread_and_free(
    provider: Provider, open_channel: ChannelFactory, huge: HugeUpstream
) -> None:
    consumer = await open_channel(provider)
    with pytest.raises(openai.APIStatusError) as info:
        await paid_chat(provider.client(), consumer)
    assert info.value.status_code == 502
    assert info.value.response.headers["X-DRAIN-Error"] == "upstream_error"
    body = info.value.body
    assert isinstance(body, dict)
    assert body["message"] == f"The upstream's answer exceeded {CAP} bytes; you were not charged."
    await asyncio.wait_for(huge.done.wait(), 10)  # the provider hung up: the upstream stopped
    assert not huge.finished and huge.written < CAP + IN_FLIGHT
    assert await usage_row(provider) == ("failed", 0, 0)
    assert await charged(provider, consumer.channel_id) == 0


@pytest.mark.rule(3)
async def test_a_json_answer_whose_length_passes_the_cap_is_refused_before_its_body(
    provider: Provider, open_channel: ChannelFactory, huge: HugeUpstream
) -> None:
    huge.shape = "json_with_length"
    consumer = await open_channel(provider)
    with pytest.raises(openai.APIStatusError) as info:
        await paid_chat(provider.client(), consumer)  # the upstream holds its body back meanwhile
    assert info.value.status_code == 502 and "exceeded" in str(info.value.body)
    assert huge.written == 0
    huge.release_body.set()
    await asyncio.wait_for(huge.done.wait(), 10)
    assert not huge.finished
    assert await charged(provider, consumer.channel_id) == 0


async def raw_stream(provider: Provider, voucher: str) -> tuple[int, bytes]:
    body = {"model": "demo", "messages": [{"role": "user", "content": "Say a lot"}], "stream": True}
    body["max_tokens"] = 2_000_000  # so that the reservation is not what stops the stream
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{provider.url}/chat/completions", json=body, headers={"X-DRAIN-Voucher": voucher}) as resp,
    ):
        return resp.status, await resp.read()


def cost_line(text: str) -> int:
    match = re.search(r"^: X-DRAIN-Cost: (\d+)$", text, re.MULTILINE)
    assert match is not None
    return int(match.group(1))


@pytest.mark.rule(5)
async def test_a_stream_past_the_cap_stops_there_and_is_charged_what_was_delivered(
    provider: Provider, open_channel: ChannelFactory, huge: HugeUpstream
) -> None:
    huge.shape = "events"
    consumer = await open_channel(provider)
    status, raw = await raw_stream(provider, consumer.next_voucher(5_000_000).header_value())
    assert status == 200 and len(raw) <= CAP + 4096  # what was relayed, and our closing events
    text = raw.decode()
    delivered = "".join(
        c["choices"][0]["delta"].get("content") or ""
        for c in (json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {"))
        if c.get("choices")
    )
    assert delivered and set(delivered.split()) == {"word"}
    assert "event: error" in text and f"exceeded {CAP} bytes" in text and "charged for what was delivered" in text
    assert "data: [DONE]" not in text
    await asyncio.wait_for(huge.done.wait(), 10)
    assert not huge.finished and huge.written < CAP + IN_FLIGHT
    row_status, output_tokens, row_cost = await usage_row(provider)
    assert row_status == "partial" and output_tokens == provider.app[COUNTER].count_text("demo", delivered)
    assert cost_line(text) == row_cost == await charged(provider, consumer.channel_id) > 0


@pytest.mark.rule(5)
async def test_one_event_past_the_cap_is_not_held_and_nothing_is_charged(
    provider: Provider, open_channel: ChannelFactory, huge: HugeUpstream
) -> None:
    """The event never ends: the parser may not buffer it without end. Only the role chunk reached
    the client, so nothing is charged (docs/DESIGN.md, rule 5)."""
    huge.shape = "one_event"
    consumer = await open_channel(provider)
    status, raw = await raw_stream(provider, consumer.next_voucher(5_000_000).header_value())
    text = raw.decode()
    assert status == 200 and len(raw) < 4096
    assert f"exceeded {CAP} bytes" in text and "You were not charged." in text
    assert cost_line(text) == 0
    await asyncio.wait_for(huge.done.wait(), 10)
    assert not huge.finished and huge.written < CAP + IN_FLIGHT
    assert await usage_row(provider) == ("failed", 0, 0)
    assert await charged(provider, consumer.channel_id) == 0
