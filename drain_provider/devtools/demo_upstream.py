"""A small OpenAI-compatible model server: the upstream of `dev` mode and of the tests.

It speaks the real wire format (chat and legacy completions, JSON and SSE with the final usage
chunk, /v1/models) and answers deterministically, with usage counted by tiktoken, so that a
paid call's cost can be predicted exactly.

Test hook: a last user message of the form `!demo {"status": 500}` makes the server behave as
asked, per request, so tests can drive failures through the provider without mocks. Options:
`status` (answer that HTTP error), `delay` (seconds before answering), `usage` (false: omit the
usage object), `reply` (the exact answer text), `prompt_tokens`/`completion_tokens` (override
the reported usage), `ignore_max_tokens` (true: do not stop at max_tokens), `invalid_json`
(true: answer 200 with a body that is not JSON), `echo_key` (with `status`: put the API key
it received in the error message, as OpenAI's 401 does), `token_delay` (seconds between
streamed tokens), `cost` (a number: put it in the usage as `usage.cost`, in USD, as OpenRouter
does). An image prompt takes the same directive (`status` only).

It also serves POST /v1/embeddings (deterministic vectors, float or base64 as asked, usage
counted by tiktoken) and POST /v1/images/generations (n tiny PNGs as b64_json), so that the
per-token-input and per-request billing can be tested end to end.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import struct
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import tiktoken
from aiohttp import web

from ..tokens import OFFLINE_ENCODING, TokenCounter

DEMO_MODEL = "demo"
DIRECTIVE = "!demo "


@dataclass
class DemoStats:
    """What the server saw, for tests that check what reached the upstream."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    authorizations: list[str | None] = field(default_factory=list)  # each request's Authorization header
    streams_started: int = 0
    # (content events sent, time.monotonic()) of each stream whose client went away
    streams_cancelled: list[tuple[int, float]] = field(default_factory=list)


DEMO_STATS = web.AppKey("demo_stats", DemoStats)


def _counter() -> TokenCounter:
    return TokenCounter(default_encoding=OFFLINE_ENCODING)


def _encoding() -> tiktoken.Encoding:
    return tiktoken.get_encoding(OFFLINE_ENCODING)


def _last_user_text(messages: list[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _directive(text: str) -> dict[str, Any]:
    if not text.startswith(DIRECTIVE):
        return {}
    try:
        options = json.loads(text[len(DIRECTIVE) :])
    except ValueError:
        return {}
    return options if isinstance(options, dict) else {}


def demo_reply(prompt: str) -> str:
    """The deterministic answer of the demo model."""
    words = prompt.split()
    opening = " ".join(words[:6]) + (" ..." if len(words) > 6 else "")
    return (
        f'This is the demo model of drain-provider. Your message had {len(words)} words and began "{opening}". '
        "To sell a real model's answers: dev --upstream URL, or UPSTREAM_BASE_URL for the server."
    )


def _limit(body: dict[str, Any], default: int | None) -> int | None:
    limits = [v for k in ("max_completion_tokens", "max_tokens") if isinstance(v := body.get(k), int)]
    return min(limits) if limits else default


def _truncate(text: str, limit: int | None) -> tuple[str, int, str]:
    tokens = _encoding().encode(text, disallowed_special=())
    if limit is not None and len(tokens) > limit:
        return _encoding().decode(tokens[:limit]), limit, "length"
    return text, len(tokens), "stop"


async def _chat(request: web.Request) -> web.StreamResponse:
    body = await _read(request)
    messages = body.get("messages") or []
    prompt_text = _last_user_text(messages)
    options = _directive(prompt_text)
    prompt_tokens = _counter().count_messages(body.get("model", DEMO_MODEL), messages, tools=body.get("tools"))
    reply = options.get("reply") or demo_reply(prompt_text)
    return await _answer(request, body, options, reply, prompt_tokens, chat=True)


async def _legacy(request: web.Request) -> web.StreamResponse:
    body = await _read(request)
    prompt = body.get("prompt")
    prompt_text = prompt if isinstance(prompt, str) else json.dumps(prompt)
    options = _directive(prompt_text)
    prompt_tokens = _counter().count_prompt(body.get("model", DEMO_MODEL), prompt)
    reply = options.get("reply") or demo_reply(prompt_text)
    return await _answer(request, body, options, reply, prompt_tokens, chat=False, default_limit=16)


async def _answer(
    request: web.Request,
    body: dict[str, Any],
    options: dict[str, Any],
    reply: str,
    prompt_tokens: int,
    *,
    chat: bool,
    default_limit: int | None = None,
) -> web.StreamResponse:
    if options.get("delay"):
        await asyncio.sleep(float(options["delay"]))
    if options.get("status"):
        status = int(options["status"])
        message = f"demo upstream error {status}"
        if options.get("echo_key"):  # as OpenAI does in its 401s: the key it was given
            message += f": key {request.headers.get('Authorization', '')[len('Bearer ') :]}"
        error = {"message": message, "type": "server_error", "code": None}
        return web.json_response({"error": error}, status=status)
    if options.get("invalid_json"):
        return web.Response(text="<html>not json</html>", content_type="application/json")
    limit = None if options.get("ignore_max_tokens") else _limit(body, default_limit)
    text, completion_tokens, finish = _truncate(reply, limit)
    usage = {
        "prompt_tokens": int(options.get("prompt_tokens", prompt_tokens)),
        "completion_tokens": int(options.get("completion_tokens", completion_tokens)),
    }
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    if "cost" in options:
        usage["cost"] = options["cost"]
    model = body.get("model", DEMO_MODEL)
    ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    if body.get("stream"):
        head = {
            "id": ident,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_demo",
        }
        return await _stream(request, options, _stream_events(body, options, text, finish, usage, head, chat=chat))
    if chat:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": None,
            "finish_reason": finish,
        }
        answer: dict[str, Any] = {"id": ident, "object": "chat.completion", "created": created, "model": model}
    else:
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
        answer = {"id": ident, "object": "text_completion", "created": created, "model": model}
    answer["choices"] = [choice]
    if options.get("usage", True):
        answer["usage"] = usage
    answer["system_fingerprint"] = "fp_demo"
    return web.json_response(answer)


def _pieces(text: str) -> list[str]:
    """The text cut at token boundaries, as a model streams it (multi-byte characters kept whole)."""
    encoding = _encoding()
    pieces: list[str] = []
    pending = b""
    for token in encoding.encode(text, disallowed_special=()):
        pending += encoding.decode_single_token_bytes(token)
        try:
            pieces.append(pending.decode("utf-8"))
            pending = b""
        except UnicodeDecodeError:
            continue
    return pieces


def _stream_events(
    body: dict[str, Any],
    options: dict[str, Any],
    text: str,
    finish: str,
    usage: dict[str, Any],
    head: dict[str, Any],
    *,
    chat: bool,
) -> list[tuple[str, bytes]]:
    """The stream as (kind, bytes) events, kind "content" for those that carry a token."""
    include_usage = bool((body.get("stream_options") or {}).get("include_usage")) and options.get("usage", True)

    def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        chunk = {**head, "choices": choices, **({"usage": None} if include_usage else {}), **extra}
        return b"data: " + json.dumps(chunk).encode() + b"\n\n"

    def choice(content: str | None, finish_reason: str | None) -> dict[str, Any]:
        if not chat:
            return {"text": content or "", "index": 0, "logprobs": None, "finish_reason": finish_reason}
        delta = {} if content is None else {"content": content}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    events: list[tuple[str, bytes]] = []
    if chat:
        role = {"role": "assistant", "content": "", "refusal": None}
        events.append(("role", event([{"index": 0, "delta": role, "logprobs": None, "finish_reason": None}])))
    events += [("content", event([choice(piece, None)])) for piece in _pieces(text)]
    events.append(("finish", event([choice(None, finish)])))
    if include_usage:
        events.append(("usage", event([], usage=usage)))
    events.append(("done", b"data: [DONE]\n\n"))
    return events


async def _stream(request: web.Request, options: dict[str, Any], events: list[tuple[str, bytes]]) -> web.StreamResponse:
    """Stream the answer, misbehaving as the directive asks: `token_delay`, `die_after` K
    content events (the connection is cut), `error_after` K (an error event), `malformed_after`
    K (an event that is not JSON), `split` (events cut into writes of that many bytes, 3 if true),
    `merge` (the whole stream in one write), `crlf` line endings, `comments` (keep-alive comments
    between events)."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    stats = request.app[DEMO_STATS]
    stats.streams_started += 1
    delay = float(options.get("token_delay", 0))
    out: list[bytes] = []
    content_sent = 0
    try:
        for kind, data in events:
            if kind == "content":
                if content_sent == options.get("die_after"):
                    await response.write(b"".join(out))
                    assert request.transport is not None
                    request.transport.close()  # mid-stream, without the chunked terminator
                    return response
                if content_sent == options.get("error_after"):
                    out.append(b'data: {"error": {"message": "demo upstream overloaded", "type": "server_error"}}\n\n')
                    break
                if content_sent == options.get("malformed_after"):
                    out.append(b"data: {this is not json\n\n")
                content_sent += 1
                if delay:
                    await asyncio.sleep(delay)
            out.append(_framed(data, options))
            if not options.get("merge"):
                await _write(response, b"".join(out), options)
                out.clear()
        await response.write(b"".join(out))
        await response.write_eof()
    except (asyncio.CancelledError, ConnectionResetError):
        stats.streams_cancelled.append((content_sent, time.monotonic()))
        raise
    return response


def _framed(event: bytes, options: dict[str, Any]) -> bytes:
    if options.get("crlf"):
        event = event.replace(b"\n", b"\r\n")
    if options.get("comments"):
        event = b": keep-alive\n\n" + event
    return event


async def _write(response: web.StreamResponse, payload: bytes, options: dict[str, Any]) -> None:
    """In one write, or in pieces of `split` bytes, each given time to be read on its own."""
    piece = 3 if options.get("split") is True else int(options.get("split") or 0)
    if not piece:
        await response.write(payload)
        return
    for start in range(0, len(payload), piece):
        await response.write(payload[start : start + piece])
        await asyncio.sleep(0.001)


async def _read(request: web.Request) -> dict[str, Any]:
    body: dict[str, Any] = await request.json()
    stats = request.app[DEMO_STATS]
    stats.requests.append(body)
    stats.authorizations.append(request.headers.get("Authorization"))
    return body


def _vector(text: str, dimensions: int = 8) -> list[float]:
    """A deterministic unit-ish vector of a text, exactly representable in float32."""
    digest = hashlib.sha256(text.encode()).digest()
    return [(byte - 128) / 128 for byte in digest[:dimensions]]


async def _embeddings(request: web.Request) -> web.Response:
    body = await _read(request)
    value = body.get("input")
    inputs = [value] if isinstance(value, str) or (value and isinstance(value[0], int)) else list(value or [])
    data = []
    for index, item in enumerate(inputs):
        vector = _vector(item if isinstance(item, str) else json.dumps(item))
        embedding: Any = vector
        if body.get("encoding_format") == "base64":
            embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    tokens = _counter().count_prompt(body.get("model", DEMO_MODEL), value)
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return web.json_response({"object": "list", "data": data, "model": body.get("model"), "usage": usage})


# A PNG of one pixel, base64.
_PIXEL = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="


async def _images(request: web.Request) -> web.Response:
    body = await _read(request)
    options = _directive(str(body.get("prompt", "")))
    if options.get("status"):
        error = {"message": f"demo upstream error {options['status']}", "type": "server_error", "code": None}
        return web.json_response({"error": error}, status=int(options["status"]))
    n = body.get("n") or 1
    return web.json_response({"created": int(time.time()), "data": [{"b64_json": _PIXEL} for _ in range(n)]})


async def _models(request: web.Request) -> web.Response:
    data = [{"id": DEMO_MODEL, "object": "model", "created": 0, "owned_by": "drain-provider-demo"}]
    return web.json_response({"object": "list", "data": data})


def create_demo_upstream() -> web.Application:
    """The demo model as an aiohttp app; serve it on any port and use `<url>/v1` as base URL."""
    app = web.Application()
    app[DEMO_STATS] = DemoStats()
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_post("/v1/completions", _legacy)
    app.router.add_post("/v1/embeddings", _embeddings)
    app.router.add_post("/v1/images/generations", _images)
    app.router.add_get("/v1/models", _models)
    return app


def main(argv: list[str] | None = None) -> None:
    """Serve the demo model on its own: `python -m drain_provider.devtools.demo_upstream --port 8100`."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m drain_provider.devtools.demo_upstream", description=main.__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args(argv)
    web.run_app(
        create_demo_upstream(), host=args.host, port=args.port, print=None, access_log=None, handler_cancellation=True
    )


if __name__ == "__main__":
    main()
