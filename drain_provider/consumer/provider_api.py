"""The provider's HTTP API as the consumer CLI uses it (aiohttp, a dependency already): discovery,
channel status, cooperative close, and a paid streamed chat whose figures are read from the
stream's comment lines."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from .. import sse
from ..protocol import Domain, consumer_request_digest, sign_digest
from .discovery import DiscoveryError, ProviderFacts, provider_facts
from .transport import FIGURES, VOUCHER_HEADER

TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=300)


class ProviderError(Exception):
    """The provider refused, or did not answer as a DRAIN provider does. Safe to show."""

    def __init__(self, message: str, *, status: int = 0, code: str = "", retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.retry_after = retry_after


async def _refusal(response: aiohttp.ClientResponse) -> ProviderError:
    """The provider's error answer (OpenAI-style JSON plus X-DRAIN-Error) as an exception."""
    code = response.headers.get("X-DRAIN-Error", "")
    try:
        message = str((await response.json(content_type=None))["error"]["message"])
    except (ValueError, KeyError, TypeError, aiohttp.ClientError):
        message = response.reason or "no message"
    retry = response.headers.get("Retry-After", "")
    return ProviderError(
        f"the provider answered {response.status} {code or ''}: {message[:300]}".replace("  ", " "),
        status=response.status,
        code=code,
        retry_after=int(retry) if retry.isdigit() else None,
    )


async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as response:
        if response.status != 200:
            raise await _refusal(response)
        try:
            return await response.json(content_type=None)
        except ValueError:
            raise ProviderError(f"{url} did not answer JSON") from None


async def discover(session: aiohttp.ClientSession, api: str) -> ProviderFacts:
    """Who and where: /v1/pricing, then the contract from the 402 a voucherless request gets
    (the protocol's own discovery), else from /v1/signing."""
    pricing = await get_json(session, f"{api}/pricing")
    async with session.post(f"{api}/chat/completions", json={}) as response:
        headers = {
            name: response.headers[name]
            for name in ("X-Payment-Contract", "X-Payment-Chain")
            if name in response.headers
        }
    source: dict[str, Any] = headers if len(headers) == 2 else await get_json(session, f"{api}/signing")
    try:
        return provider_facts(api, pricing, source)
    except DiscoveryError as exc:
        raise ProviderError(str(exc)) from None


async def channel_status(session: aiohttp.ClientSession, api: str, channel_id: str) -> dict[str, Any]:
    """GET /v1/channels/{id}: the provider's view of the channel (what it holds, what comes next)."""
    answer = await get_json(session, f"{api}/channels/{channel_id}")
    if not isinstance(answer, dict) or answer.get("channelId", "").lower() != channel_id.lower():
        raise ProviderError("the channel status is not about this channel")
    return answer


def consumer_request(private_key: bytes, domain: Domain, channel_id: str, action: str) -> dict[str, Any]:
    """The consumer's signed ConsumerRequest (EIP-712) proving a request about its channel is its own."""
    timestamp = int(time.time())
    digest = consumer_request_digest(domain.separator, channel_id, action, timestamp)
    return {"timestamp": timestamp, "signature": "0x" + sign_digest(private_key, digest).hex()}


async def request_close(
    session: aiohttp.ClientSession, api: str, channel_id: str, signed: dict[str, Any]
) -> dict[str, Any]:
    """POST /v1/close-channel: the provider's CloseAuthorization (finalAmount, signature)."""
    async with session.post(f"{api}/close-channel", json={"channelId": channel_id, **signed}) as response:
        if response.status != 200:
            raise await _refusal(response)
        answer = await response.json(content_type=None)
    if not isinstance(answer, dict) or not isinstance(answer.get("signature"), str):
        raise ProviderError("the close authorization has no signature")
    return answer


@dataclass
class ChatResult:
    text: str = ""
    figures: dict[str, str] = field(default_factory=dict)
    error: str | None = None  # an SSE error event's message, mid-stream


def _delta_text(data: bytes) -> str:
    try:
        chunk = json.loads(data)
        choices = chunk.get("choices") or []
        return "".join(str((c.get("delta") or {}).get("content") or c.get("text") or "") for c in choices)
    except (ValueError, AttributeError, TypeError):
        return ""


async def stream_chat(
    session: aiohttp.ClientSession,
    api: str,
    body: dict[str, Any],
    voucher_header: str,
    on_text: Callable[[str], None],
) -> ChatResult:
    """A paid streamed chat completion: the text handed to `on_text` as it comes, the figures
    from the comment lines before [DONE]."""
    result = ChatResult()
    headers = {VOUCHER_HEADER: voucher_header}
    async with session.post(f"{api}/chat/completions", json=body, headers=headers) as response:
        if response.status != 200:
            raise await _refusal(response)
        parser = sse.Parser(1 << 20)
        async for chunk in response.content.iter_any():
            for event in parser.feed(chunk):
                for comment in event.comments:
                    name, _, value = comment.partition(":")
                    if name.strip() in FIGURES:
                        result.figures[name.strip()] = value.strip()
                if event.event == "error" and event.data is not None:
                    result.error = event.data.decode("utf-8", "replace")[:300]
                elif event.data is not None and event.data != b"[DONE]":
                    text = _delta_text(event.data)
                    if text:
                        result.text += text
                        on_text(text)
    return result
