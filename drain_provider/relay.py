"""Relaying an upstream's SSE stream to the client, event by event, metering as it goes.

The relay knows server-sent events, the OpenAI chunk format (through `openai_format`) and
tokens; it knows nothing about vouchers or money. It is given a `TokenMeter` whose limit is what
the request may deliver, and it reports how the stream ended (`StreamEnding`), what the upstream
reported, and, through the meter, what reached the client. No event is written before the meter
knows it fits. No more than `max_bytes` are taken from the upstream: a stream that goes on past
them ends as an upstream failure, like one that broke off.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web

from . import openai_format, safejson, sse
from .openai_format import Usage
from .requestinfo import current, now
from .states import StreamEnding, UsageSource
from .tokens import TokenMeter
from .upstream import UpstreamError

log = logging.getLogger(__name__)


async def read_until_break(content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """The bytes of a response body as they arrive, then, if the connection breaks, the bytes
    that arrived before the break, then the error.

    aiohttp's `readany` raises a stored connection error before it returns what is already in
    its buffer. An upstream that writes its last events and drops the connection in one go would
    lose those events here, or not, depending on how the two reached our event loop: the same
    upstream behaviour would be relayed and charged one run, and refused as "not charged" the
    next. What reached our socket is relayed. (The one private attribute the package reads;
    tests/test_relay.py pins it.)
    """
    while True:
        try:
            chunk = await content.readany()
        except aiohttp.ClientPayloadError:
            if content._buffer:
                yield content._read_nowait(-1)
            raise
        if not chunk:
            return
        yield chunk


class StreamRelay:
    """Forward one upstream SSE stream to the client.

    `run` returns how the stream ended. It raises UpstreamError instead when the upstream fails
    before the client was sent anything, so that the client can get a plain JSON error. The
    response is prepared, with `headers`, at the first event worth sending.
    """

    def __init__(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        *,
        headers: dict[str, str],
        meter: TokenMeter,
        client_wants_usage: bool,
        chat: bool,
        max_bytes: int,
        model: str | None = None,
    ) -> None:
        self.request = request
        self.upstream = upstream
        self.response = web.StreamResponse(headers=headers)
        self.meter = meter
        self.client_wants_usage = client_wants_usage
        self.chat = chat
        self.max_bytes = max_bytes
        self.model = model  # the name each chunk's `model` is given (the one the client asked), if not the upstream's
        self.ending: StreamEnding | None = None
        self.error_message = ""
        self.malformed_events = 0
        self._reported: Usage | None = None
        self._identity: dict[str, Any] = {}
        self._choices: set[int] = set()
        self._info = current()  # the access log's record: when streaming began, the first content
        self._content_sent = False

    @property
    def started(self) -> bool:
        return self.response.prepared

    @property
    def upstream_usage(self) -> Usage | None:
        """The usage the upstream reported, if it covers what the client got: not when events
        were skipped as malformed (the client did not get them)."""
        return None if self.malformed_events else self._reported

    async def run(self) -> StreamEnding:
        parser = sse.Parser(max_event_bytes=self.max_bytes)
        taken = 0
        too_large = f"The upstream's answer exceeded {self.max_bytes} bytes."
        try:
            async for chunk in read_until_break(self.upstream.content):
                taken += len(chunk)
                if taken > self.max_bytes:  # not a byte of this chunk is relayed, nor read beyond it
                    self.error_message = too_large
                    break
                for event in parser.feed(chunk):
                    if await self._relay(event):
                        return self._ended()
            else:
                for event in parser.close():
                    if await self._relay(event):
                        return self._ended()
                self.error_message = "The upstream stream ended without [DONE]."
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.error_message = f"The upstream stream broke off ({type(exc).__name__})."
        except sse.EventTooLarge:  # the parser's own guard; the bound on the total comes first
            self.error_message = too_large
        log.warning("upstream_stream_failed delivered_tokens=%d reason=%s", self.meter.tokens, self.error_message)
        return self._failed()

    def _ended(self) -> StreamEnding:
        assert self.ending is not None
        return self.ending

    def _failed(self) -> StreamEnding:
        if not self.started:
            raise UpstreamError((self.error_message or "The upstream failed.") + " You were not charged.")
        self.ending = StreamEnding.UPSTREAM_FAILED
        return self.ending

    async def _relay(self, event: sse.Event) -> bool:
        """Handle one upstream event; True when the stream ends here."""
        if event.data is None:  # a comment or keep-alive: keeps the client's connection warm too
            return self.started and await self._send(event.raw)
        if event.data == b"[DONE]" or event.data.strip() == b"[DONE]":
            self.ending = StreamEnding.DONE
            return True
        try:
            chunk = safejson.loads(event.data)
        except ValueError:
            chunk = None
        if not isinstance(chunk, dict):
            self.malformed_events += 1
            log.warning("upstream_malformed_event count=%d bytes=%d", self.malformed_events, len(event.data))
            return False
        if chunk.get("error"):
            self._upstream_error(chunk["error"])
            return True
        return await self._relay_chunk(chunk, event.raw)

    def _upstream_error(self, error: Any) -> None:
        message = error.get("message") if isinstance(error, dict) else None
        self.error_message = f"The upstream failed mid-stream: {str(message)[:200]}" if message else ""
        self._failed()

    async def _relay_chunk(self, chunk: dict[str, Any], raw: bytes) -> bool:
        if self.model is not None and "model" in chunk and chunk["model"] != self.model:
            chunk["model"] = self.model
            raw = sse.encode(data=safejson.dumps(chunk).decode())
        if chunk.get("usage"):  # most chunks have none
            self._reported = openai_format.reported_usage(chunk) or self._reported
        self._remember(chunk)
        if not chunk.get("choices"):
            if chunk.get("usage") and not self.client_wants_usage:
                return False  # the usage chunk we asked for, not the client
            return await self._send(raw)
        text = openai_format.generated_text(chunk, "delta")
        if not self.meter.fits(text):
            self.ending = StreamEnding.BUDGET
            return True
        if await self._send(raw):
            return True
        self.meter.add(text)
        if text and not self._content_sent:
            self._content_sent = True
            if self._info is not None:
                self._info.first_content = now()
        return False

    def _remember(self, chunk: dict[str, Any]) -> None:
        """What a chunk we write ourselves must look like (ids do not change within a stream)."""
        if not self._identity:
            self._identity = openai_format.stream_identity(chunk)
        self._choices.update(openai_format.chunk_indexes(chunk))

    async def _send(self, data: bytes) -> bool:
        """Write to the client; True if the client is gone."""
        try:
            if not self.started:
                await self.response.prepare(self.request)
                if self._info is not None:
                    self._info.streaming = True
            await self.response.write(data)
        except ConnectionResetError:
            self.ending = StreamEnding.CLIENT_GONE
            return True
        return False

    async def _send_json(self, chunk: dict[str, Any], event: str | None = None) -> None:
        await self._send(sse.encode(event=event, data=safejson.dumps(chunk).decode()))

    async def stop_for_budget(self, input_tokens: int) -> None:
        """End a stream cut at the budget as a model would: finish_reason "length" on every
        choice, then the usage chunk if the client asked for one (our own counts)."""
        for index in sorted(self._choices or {0}):
            await self._send_json(openai_format.length_chunk(self._identity, index, chat=self.chat))
        if self.client_wants_usage:
            usage = Usage(input_tokens, self.meter.tokens, UsageSource.LOCAL)
            await self._send_json(openai_format.usage_chunk(self._identity, usage, chat=self.chat))

    async def finish(self, comments: list[str], *, charged: bool) -> None:
        """`comments` (the cost report) as SSE comment lines, then [DONE], or the error event of a
        stream the upstream broke off: clients that stop reading at [DONE] still see them.
        `charged`: whether the request, already settled, cost anything (the error event says)."""
        if self.ending is StreamEnding.UPSTREAM_FAILED:
            outcome = " You were charged for what was delivered." if charged else " You were not charged."
            message = (self.error_message or "The upstream failed mid-stream.") + outcome
            await self._send_json(openai_format.error_body(message, "upstream_error", "upstream_error"), event="error")
        if comments:  # none when the request was served free
            await self._send(sse.encode(comments=comments))
        if self.ending is not StreamEnding.UPSTREAM_FAILED:
            await self._send(sse.encode(data="[DONE]"))
        with contextlib.suppress(ConnectionResetError):
            await self.response.write_eof()
