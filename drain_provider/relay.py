"""Relaying a completion from the upstream, and metering it.

This module knows tokens and the OpenAI wire format, not vouchers: it is told what a request
may cost (its budget) and reports how many tokens it delivered and what the upstream reported.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import aiohttp
import tiktoken
from aiohttp import web

from . import safejson, sse
from .pricing import ModelPrice, affordable_output_tokens
from .tokens import TokenCounter
from .upstream import UpstreamError

log = logging.getLogger(__name__)

MAX_TOKEN_FIELDS = ("max_completion_tokens", "max_tokens")


@dataclass(frozen=True)
class Usage:
    input_tokens: int
    output_tokens: int
    source: str  # "upstream": reported by the upstream; "local": counted by us


def requested_output_tokens(body: dict[str, Any]) -> int | None:
    """The client's own output limit, per choice (validated by the API before this is called)."""
    limits = [body[field] for field in MAX_TOKEN_FIELDS if body.get(field) is not None]
    return min(limits) if limits else None


def upstream_body(body: dict[str, Any], output_cap: int, default_field: str) -> dict[str, Any]:
    """The request as sent upstream: the client's body with its output limit lowered to what the
    reservation pays for. The client's own field is kept; if it gave none, `default_field`."""
    capped = dict(body)
    fields = [field for field in MAX_TOKEN_FIELDS if body.get(field) is not None] or [default_field]
    for field in fields:
        capped[field] = min(body.get(field) or output_cap, output_cap)
    return capped


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def generated_text(data: dict[str, Any], part: str) -> str:
    """The text the choices of a completion (part "message") or of a stream chunk (part "delta")
    carry: content, reasoning, refusals, tool names and arguments; "text" for legacy ones."""
    parts: list[str] = []
    choices = data.get("choices")
    for choice in choices if isinstance(choices, list) else []:
        if not isinstance(choice, dict):
            continue
        if isinstance(choice.get("text"), str):  # legacy completions
            parts.append(choice["text"])
        body = choice.get(part)
        if not isinstance(body, dict):
            continue
        for key in ("content", "reasoning_content", "refusal"):
            if isinstance(body.get(key), str):
                parts.append(body[key])
        for call in body.get("tool_calls") or ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                parts.extend(v for v in (function.get("name"), function.get("arguments")) if isinstance(v, str))
    return "".join(parts)


def reported_usage(data: dict[str, Any]) -> Usage | None:
    """The `usage` object of a completion or a stream chunk, if it has valid token counts."""
    usage = data.get("usage")
    if isinstance(usage, dict):
        prompt = _int_or_none(usage.get("prompt_tokens"))
        completion = _int_or_none(usage.get("completion_tokens"))
        if prompt is not None and completion is not None:
            return Usage(prompt, completion, "upstream")
    return None


def response_usage(data: dict[str, Any], counter: TokenCounter, model: str, counted_input: int) -> Usage:
    """Usage as the upstream reports it; where it does not, our own count."""
    return reported_usage(data) or Usage(
        counted_input, counter.count_text(model, generated_text(data, "message")), "local"
    )


# --- streaming ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamBudget:
    """What a stream may cost: the reservation made for it."""

    price: ModelPrice
    input_tokens: int
    amount: int

    @property
    def output_tokens(self) -> int | None:
        """The most output tokens it pays for; None when output is free."""
        return affordable_output_tokens(self.price, self.amount, self.input_tokens)


class TokenMeter:
    """The output tokens a stream has delivered, counted only as often as the budget needs.

    A tiktoken call per token event is a good part of what relaying one costs. But a text of n
    UTF-8 bytes is at most n tokens (every BPE token is at least one byte), so while the texts
    collected so far could not pass the limit even at one token per byte they are only kept;
    they are counted, together, when the next one might pass it, and when the total is asked
    for. Counting the joined text also matches the upstream's own count better than adding up
    the tokens of each fragment.
    """

    def __init__(self, encoding: tiktoken.Encoding, limit: int | None) -> None:
        self.encoding = encoding
        self.limit = limit
        self._counted = 0
        self._pending: list[str] = []
        self._pending_bound = 0  # UTF-8 bytes of _pending: at least its tokens

    def fits(self, text: str) -> bool:
        """Whether delivering `text` as well stays within the limit (records nothing)."""
        if self.limit is None:
            return True
        bound = len(text.encode())
        if self._counted + self._pending_bound + bound <= self.limit:
            return True
        return self.tokens + self._count(text) <= self.limit

    def add(self, text: str) -> None:
        """`text` reached the client."""
        if text:
            self._pending.append(text)
            self._pending_bound += len(text.encode())

    @property
    def tokens(self) -> int:
        if self._pending:
            self._counted += self._count("".join(self._pending))
            self._pending.clear()
            self._pending_bound = 0
        return self._counted

    def _count(self, text: str) -> int:
        return len(self.encoding.encode(text, disallowed_special=())) if text else 0


class StreamRelay:
    """Forward one upstream SSE stream to the client, event by event, metering as it goes.

    `run` returns how the stream ended: "done" (the upstream finished), "budget" (the next event
    would pass what the reservation pays for: the upstream is dropped), "client_gone" (a write
    failed), or "upstream_failed" (the upstream broke off or sent an error event). It raises
    UpstreamError instead when the upstream fails before the client was sent anything, so that
    the client can get a plain JSON error. The response is prepared at the first event, with
    `headers`.
    """

    def __init__(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        *,
        headers: dict[str, str],
        encoding: tiktoken.Encoding,
        budget: StreamBudget,
        client_wants_usage: bool,
        chat: bool,
    ) -> None:
        self.request = request
        self.upstream = upstream
        self.response = web.StreamResponse(headers=headers)
        self.meter = TokenMeter(encoding, budget.output_tokens)
        self.client_wants_usage = client_wants_usage
        self.chat = chat
        self.upstream_usage: Usage | None = None
        self.malformed_events = 0
        self.ending = ""
        self.error_message = ""
        self._last: dict[str, Any] = {}
        self._choices: set[int] = set()

    @property
    def started(self) -> bool:
        return self.response.prepared

    @property
    def delivered_tokens(self) -> int:
        return self.meter.tokens

    async def run(self) -> str:
        parser = sse.Parser()
        try:
            async for chunk in self.upstream.content.iter_any():
                for event in parser.feed(chunk):
                    if await self._relay(event):
                        return self.ending
            for event in parser.close():
                if await self._relay(event):
                    return self.ending
            self.error_message = "The upstream stream ended without [DONE]."
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.error_message = f"The upstream stream broke off ({type(exc).__name__})."
        log.warning("upstream_stream_failed delivered_tokens=%d reason=%s", self.delivered_tokens, self.error_message)
        if not self.started:
            raise UpstreamError(self.error_message + " You were not charged.")
        self.ending = "upstream_failed"
        return self.ending

    async def _relay(self, event: sse.Event) -> bool:
        """Handle one upstream event; True when the stream must end here."""
        if event.data is None:  # a comment or keep-alive: keeps the client's connection warm too
            return self.started and await self._send(event.raw)
        if event.data == b"[DONE]" or event.data.strip() == b"[DONE]":
            self.ending = "done"
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
            error = chunk["error"]
            message = error.get("message") if isinstance(error, dict) else None
            self.error_message = f"The upstream failed mid-stream: {str(message)[:200]}" if message else ""
            if not self.started:
                raise UpstreamError((self.error_message or "The upstream failed.") + " You were not charged.")
            self.ending = "upstream_failed"
            return True
        usage = reported_usage(chunk) if chunk.get("usage") else None  # most events have none
        if usage is not None:
            self.upstream_usage = usage
        self._remember(chunk)
        if not chunk.get("choices"):
            if usage is not None and not self.client_wants_usage:
                return False  # the usage chunk we asked for, not the client
            return await self._send(event.raw)
        text = generated_text(chunk, "delta")
        if not self.meter.fits(text):
            self.ending = "budget"
            return True
        if await self._send(event.raw):
            return True
        self.meter.add(text)
        return False

    def _remember(self, chunk: dict[str, Any]) -> None:
        """What a chunk we write ourselves must look like (ids do not change within a stream)."""
        if not self._last:
            self._last = {k: chunk[k] for k in ("id", "object", "created", "model", "system_fingerprint") if k in chunk}
        choices = chunk.get("choices")
        if isinstance(choices, list) and len(choices) == 1 and 0 in self._choices:
            first = choices[0]
            if isinstance(first, dict) and first.get("index") == 0:
                return  # the common case: one choice, already seen
        for choice in choices or ():
            if isinstance(choice, dict) and isinstance(choice.get("index"), int):
                self._choices.add(choice["index"])

    async def _send(self, data: bytes) -> bool:
        """Write to the client; True if the client is gone."""
        try:
            if not self.started:
                await self.response.prepare(self.request)
            await self.response.write(data)
        except ConnectionResetError:
            self.ending = "client_gone"
            return True
        return False

    def _chunk(self, **fields: Any) -> bytes:
        default_object = "chat.completion.chunk" if self.chat else "text_completion"
        chunk = {"id": "", "object": default_object, "created": 0, "model": "", **self._last, **fields}
        return sse.encode(data=json.dumps(chunk, separators=(",", ":")))

    async def stop_for_budget(self, input_tokens: int) -> None:
        """End a stream cut at the budget as a model would: finish_reason "length" on every
        choice, then the usage chunk if the client asked for one (our own counts)."""
        for index in sorted(self._choices or {0}):
            if self.chat:
                choice = {"index": index, "delta": {}, "logprobs": None, "finish_reason": "length"}
            else:
                choice = {"text": "", "index": index, "logprobs": None, "finish_reason": "length"}
            await self._send(self._chunk(choices=[choice]))
        if self.client_wants_usage:
            usage = {
                "prompt_tokens": input_tokens,
                "completion_tokens": self.delivered_tokens,
                "total_tokens": input_tokens + self.delivered_tokens,
            }
            await self._send(self._chunk(choices=[], usage=usage))

    async def finish(self, *, cost: int, total: int, remaining: int) -> None:
        """The cost report as SSE comments, then [DONE] (or the error event of a failed stream):
        clients that stop reading at [DONE] still see the figures."""
        if self.ending == "upstream_failed":
            message = self.error_message or "The upstream failed mid-stream."
            error = {"message": message + " You were charged for what was delivered.", "type": "upstream_error"}
            await self._send(sse.encode(event="error", data=json.dumps({"error": {**error, "code": "upstream_error"}})))
        comments = [f"X-DRAIN-Cost: {cost}", f"X-DRAIN-Total: {total}", f"X-DRAIN-Remaining: {remaining}"]
        await self._send(sse.encode(comments=comments))
        if self.ending != "upstream_failed":
            await self._send(sse.encode(data="[DONE]"))
        with contextlib.suppress(ConnectionResetError):
            await self.response.write_eof()
