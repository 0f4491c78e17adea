"""Pay for every request of an openai SDK client (or LangChain's ChatOpenAI) with one channel.

    from openai import OpenAI
    from drain_provider.consumer.transport import drain_http_client
    client = OpenAI(base_url=consumer.api, api_key="drain", http_client=drain_http_client(consumer))

An httpx transport (sync and async; the openai SDK's HTTP client is httpx2) that, for each POST
to `/chat/completions` or `/completions`, signs the exact voucher for that body
(`DrainConsumer.voucher_for`, at the model's price read once from the provider's `/v1/pricing`)
and sends it as `X-DRAIN-Voucher`; then records the provider's figures: from the headers of a
JSON answer, or, for a stream, from the `: X-DRAIN-…` comment lines as the bytes pass (the SDK's
SSE parser drops comments, so the transport reads a copy of what it hands on). Requests in
flight on the channel are counted: the provider holds each one's worst case until it ends, so a
concurrent request signs on top of them instead of being refused. Concurrent requests still
race to the provider over separate connections: one whose voucher arrives after a later nonce is
refused (invalid_nonce, before anything is charged) and is signed again and resent, at most
ORDER_RETRIES times. Those refusals count toward the provider's limit of refused payments per
address: for many requests at once, a channel per worker avoids them.

Whatever is not a paid completion (models, pricing, ...) goes through untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx2

from .. import sse
from ..openai_format import RequestError
from ..pricing import ModelPrice
from .channel import DEFAULT_MAX_TOKENS, MIN_OUTPUT_TOKENS, DrainConsumer
from .discovery import DiscoveryError, prices_from_pricing

FIGURES = ("X-DRAIN-Cost", "X-DRAIN-Total", "X-DRAIN-Remaining", "X-DRAIN-Next-Min")
VOUCHER_HEADER = "X-DRAIN-Voucher"
# Re-signings of a request whose voucher lost a race to a later one (each refusal counts toward
# the provider's PAYMENT_FAILURES_PER_MINUTE for this address).
ORDER_RETRIES = 8
MAX_EVENT_BYTES = 1 << 20  # the stream's copy is parsed for comments; no event is held past this
Figures = dict[str, str]


def paid_endpoint(request: httpx2.Request) -> str | None:
    """ "chat", "legacy" or None (not a paid request)."""
    if request.method != "POST":
        return None
    if request.url.path.endswith("/chat/completions"):
        return "chat"
    if request.url.path.endswith("/completions"):
        return "legacy"
    return None


def out_of_order(response: httpx2.Response) -> bool:
    """A voucher refused only because a later one of ours got there first (concurrent requests
    on one channel race over separate connections): nothing was charged, the body was not even
    read, so the request is signed afresh and sent again."""
    return response.status_code == 402 and response.headers.get("X-DRAIN-Error") in ("invalid_nonce", "invalid_amount")


def _pricing_request(request: httpx2.Request) -> httpx2.Request:
    root = request.url.path.rsplit("/completions", 1)[0].removesuffix("/chat")
    return httpx2.Request("GET", request.url.copy_with(path=root + "/pricing", query=None))


def _json_object(raw: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


@dataclass
class _Ticket:
    """One paid request: the worst case it added to what is in flight, until it ends."""

    reserved: int
    released: bool = False


class VoucherSigner:
    """What both transports share: the prices, the count of what is in flight, and the
    consumer's state, behind one lock (a sync client may be used from several threads)."""

    def __init__(
        self,
        consumer: DrainConsumer,
        prices: Mapping[str, ModelPrice] | None = None,
        on_figures: Callable[[Figures], None] | None = None,
        *,
        default_max_tokens: int = DEFAULT_MAX_TOKENS,
        min_output_tokens: int = MIN_OUTPUT_TOKENS,
    ) -> None:
        self.consumer = consumer
        self.prices = dict(prices or {})
        self.on_figures = on_figures
        self.default_max_tokens = default_max_tokens
        self.min_output_tokens = min_output_tokens
        self.in_flight = 0
        self.last_figures: Figures = {}  # of the last paid request that reported them
        self._asked: set[str] = set()  # models /v1/pricing was read for
        self._lock = threading.Lock()

    def _unpriced(self, body: dict[str, Any] | None) -> str | None:
        model = body.get("model") if body else None
        return model if isinstance(model, str) and model not in self.prices else None

    def may_want_prices(self, body: dict[str, Any] | None) -> bool:
        """Whether the body's model has no price yet (a cheap check before taking the lock)."""
        return self._unpriced(body) is not None

    def wants_prices(self, body: dict[str, Any] | None) -> bool:
        """Whether to read /v1/pricing now: once for each model not priced (under the
        transport's pricing lock, so that concurrent first requests wait for one read)."""
        model = self._unpriced(body)
        if model is None or model in self._asked:
            return False
        self._asked.add(model)
        return True

    def take_prices(self, status: int, raw: bytes) -> None:
        if status != 200:
            return
        # Not a price list: the request then goes with the least voucher; the provider's answer says why.
        with contextlib.suppress(DiscoveryError):
            self.prices.update(prices_from_pricing(_json_object(raw)))

    def sign(self, request: httpx2.Request, body: dict[str, Any] | None, kind: str) -> _Ticket:
        """Put the voucher for `body` on `request`. A body the provider would refuse (or a
        model without a price) goes with the least voucher it takes, so that the provider's own
        error reaches the caller."""
        worst_case = 0
        model = body.get("model") if body else None
        price = self.prices.get(model) if isinstance(model, str) else None
        if body is not None and price is not None:
            try:
                worst_case = self.consumer.worst_case(
                    body,
                    price,
                    chat=kind == "chat",
                    min_output_tokens=self.min_output_tokens,
                    default_max_tokens=self.default_max_tokens,
                )
            except RequestError:
                worst_case = 0
        with self._lock:
            voucher = self.consumer.voucher_covering(self.in_flight + worst_case)
            self.in_flight += worst_case
        request.headers[VOUCHER_HEADER] = voucher.header_value()
        return _Ticket(worst_case)

    def settle(self, ticket: _Ticket, figures: Figures) -> None:
        """Record the provider's figures (if any) and end the request's part of what is in flight."""
        with self._lock:
            if figures:
                self.consumer.record(figures)
                self.last_figures = figures
            if not ticket.released:
                ticket.released = True
                self.in_flight -= ticket.reserved
        if figures and self.on_figures is not None:
            self.on_figures(figures)

    def answered(self, response: httpx2.Response) -> Figures | None:
        """The figures of a JSON answer, None for a stream (its figures come at its end)."""
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            return None
        return {name: response.headers[name] for name in FIGURES if name in response.headers}


class _StreamTap:
    """Reads a copy of a stream's bytes for the `: X-DRAIN-…` comment lines."""

    def __init__(self, signer: VoucherSigner, ticket: _Ticket) -> None:
        self.signer = signer
        self.ticket = ticket
        self.parser: sse.Parser | None = sse.Parser(MAX_EVENT_BYTES)

    def feed(self, chunk: bytes) -> None:
        if self.parser is None:
            return
        try:
            events = self.parser.feed(chunk)
        except sse.EventTooLarge:  # not ours to police: stop reading the copy, pass the bytes on
            self.parser = None
            return
        for event in events:
            figures = {}
            for comment in event.comments:
                name, colon, value = comment.partition(":")
                if colon and name.strip() in FIGURES:
                    figures[name.strip()] = value.strip()
            if figures:
                self.signer.settle(self.ticket, figures)

    def end(self) -> None:
        self.signer.settle(self.ticket, {})


class _SyncTee(httpx2.SyncByteStream):
    def __init__(self, inner: Any, tap: _StreamTap) -> None:
        self.inner = inner
        self.tap = tap

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.inner:
            self.tap.feed(chunk)
            yield chunk

    def close(self) -> None:
        try:
            self.inner.close()
        finally:
            self.tap.end()


class _AsyncTee(httpx2.AsyncByteStream):
    def __init__(self, inner: Any, tap: _StreamTap) -> None:
        self.inner = inner
        self.tap = tap

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.inner:
            self.tap.feed(chunk)
            yield chunk

    async def aclose(self) -> None:
        try:
            await self.inner.aclose()
        finally:
            self.tap.end()


def _teed(request: httpx2.Request, response: httpx2.Response, stream: Any) -> httpx2.Response:
    return httpx2.Response(
        response.status_code,
        headers=response.headers,
        stream=stream,
        request=request,
        extensions=response.extensions,
    )


class DrainTransport(httpx2.BaseTransport):
    """The sync transport (for `openai.OpenAI`, `ChatOpenAI(http_client=...)`)."""

    def __init__(self, signer: VoucherSigner, inner: httpx2.BaseTransport | None = None) -> None:
        self.signer = signer
        self.inner = inner or httpx2.HTTPTransport()
        self._pricing_lock = threading.Lock()

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        kind = paid_endpoint(request)
        if kind is None:
            return self.inner.handle_request(request)
        body = _json_object(request.read())
        if self.signer.may_want_prices(body):
            with self._pricing_lock:
                if self.signer.wants_prices(body):
                    pricing = self.inner.handle_request(_pricing_request(request))
                    try:
                        self.signer.take_prices(pricing.status_code, pricing.read())
                    finally:
                        pricing.close()
        for attempt in range(ORDER_RETRIES + 1):
            ticket = self.signer.sign(request, body, kind)
            try:
                response = self.inner.handle_request(request)
            except BaseException:
                self.signer.settle(ticket, {})
                raise
            if attempt == ORDER_RETRIES or not out_of_order(response):
                break
            response.read()
            response.close()
            self.signer.settle(ticket, {})
        figures = self.signer.answered(response)
        if figures is not None:
            self.signer.settle(ticket, figures)
            return response
        return _teed(request, response, _SyncTee(response.stream, _StreamTap(self.signer, ticket)))

    def close(self) -> None:
        self.inner.close()


class AsyncDrainTransport(httpx2.AsyncBaseTransport):
    """The async transport (for `openai.AsyncOpenAI`, `ChatOpenAI(http_async_client=...)`)."""

    def __init__(self, signer: VoucherSigner, inner: httpx2.AsyncBaseTransport | None = None) -> None:
        self.signer = signer
        self.inner = inner or httpx2.AsyncHTTPTransport()
        self._pricing_lock = asyncio.Lock()

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        kind = paid_endpoint(request)
        if kind is None:
            return await self.inner.handle_async_request(request)
        body = _json_object(await request.aread())
        if self.signer.may_want_prices(body):
            async with self._pricing_lock:
                if self.signer.wants_prices(body):
                    pricing = await self.inner.handle_async_request(_pricing_request(request))
                    try:
                        self.signer.take_prices(pricing.status_code, await pricing.aread())
                    finally:
                        await pricing.aclose()
        for attempt in range(ORDER_RETRIES + 1):
            ticket = self.signer.sign(request, body, kind)
            try:
                response = await self.inner.handle_async_request(request)
            except BaseException:
                self.signer.settle(ticket, {})
                raise
            if attempt == ORDER_RETRIES or not out_of_order(response):
                break
            await response.aread()
            await response.aclose()
            self.signer.settle(ticket, {})
        figures = self.signer.answered(response)
        if figures is not None:
            self.signer.settle(ticket, figures)
            return response
        return _teed(request, response, _AsyncTee(response.stream, _StreamTap(self.signer, ticket)))

    async def aclose(self) -> None:
        await self.inner.aclose()


def _client_options(options: dict[str, Any]) -> dict[str, Any]:
    # The openai SDK passes its own timeout with each request; this is for other callers.
    options.setdefault("timeout", httpx2.Timeout(600.0, connect=10.0))
    return options


def drain_http_client(
    consumer: DrainConsumer,
    *,
    prices: Mapping[str, ModelPrice] | None = None,
    on_figures: Callable[[Figures], None] | None = None,
    signer: VoucherSigner | None = None,
    **options: Any,
) -> httpx2.Client:
    """An httpx2.Client that pays every completion with `consumer`'s channel: pass it as the
    openai SDK's `http_client`. `on_figures` is called with each request's X-DRAIN figures;
    `signer` shares one count of what is in flight with an async client on the same channel."""
    signer = signer or VoucherSigner(consumer, prices, on_figures)
    return httpx2.Client(transport=DrainTransport(signer), **_client_options(options))


def drain_async_http_client(
    consumer: DrainConsumer,
    *,
    prices: Mapping[str, ModelPrice] | None = None,
    on_figures: Callable[[Figures], None] | None = None,
    signer: VoucherSigner | None = None,
    **options: Any,
) -> httpx2.AsyncClient:
    """The same for `openai.AsyncOpenAI` (`http_client`) or ChatOpenAI's `http_async_client`."""
    signer = signer or VoucherSigner(consumer, prices, on_figures)
    return httpx2.AsyncClient(transport=AsyncDrainTransport(signer), **_client_options(options))
