"""The paid endpoints: POST /v1/chat/completions and POST /v1/completions, JSON or streamed.

A request is validated completely before the voucher is looked at, so a bad body never touches
the ledger. Then: reserve (PaymentGate.authorize), call the upstream with the output limit the
reservation pays for, settle on the reported usage, answer with the X-DRAIN-* figures (headers
for JSON, SSE comments before [DONE] for streams). Every path after the reservation ends in
exactly one settle or release.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .. import safejson
from ..ledger import Reservation, Settlement
from ..payments import Authorization
from ..pricing import ModelPrice, ReservationPlan, cost
from ..relay import StreamBudget, StreamRelay, Usage, requested_output_tokens, response_usage, upstream_body
from ..upstream import UpstreamError
from .errors import ApiError
from .state import COUNTER, GATE, SETTINGS, STOPPING, UPSTREAM

log = logging.getLogger(__name__)

MAX_OUTPUT_TOKENS = 10_000_000
MAX_CHOICES = 128
# OpenAI's legacy completions endpoint produces 16 tokens when max_tokens is not given.
LEGACY_DEFAULT_MAX_TOKENS = 16


@dataclass(frozen=True)
class PaidRequest:
    endpoint: str
    body: dict[str, Any]
    model: str
    price: ModelPrice
    input_tokens: int
    choices: int  # outputs generated per request (n, or best_of)
    per_choice_tokens: int

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))


async def read_json_object(request: web.Request) -> dict[str, Any]:
    raw = await request.read()  # bounded by client_max_size: larger bodies raise 413
    try:
        body = safejson.loads(raw)
    except safejson.TooDeep:
        raise ApiError(
            "invalid_request", f"The request body is nested deeper than {safejson.MAX_DEPTH} levels."
        ) from None
    except ValueError:
        raise ApiError("invalid_request", "The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise ApiError("invalid_request", "The request body must be a JSON object.")
    return body


def _positive_int(body: dict[str, Any], field: str, maximum: int) -> int | None:
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise ApiError("invalid_request", f"'{field}' must be an integer from 1 to {maximum}.")
    return value


def _model_price(request: web.Request, body: dict[str, Any]) -> tuple[str, ModelPrice]:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError("invalid_request", "'model' is required and must be a string.")
    price = request.app[SETTINGS].prices.get(model)
    if price is None:
        shown = model[:100]
        raise ApiError("model_not_supported", f"Model '{shown}' is not available here; see GET /v1/models.")
    return model, price


def _common(body: dict[str, Any]) -> tuple[int, int | None]:
    if body.get("stream") not in (None, False, True):
        raise ApiError("invalid_request", "'stream' must be a boolean.")
    options = body.get("stream_options")
    if options is not None and (
        not isinstance(options, dict) or options.get("include_usage") not in (None, False, True)
    ):
        raise ApiError("invalid_request", "'stream_options' must be an object; 'include_usage' a boolean.")
    for field in ("max_tokens", "max_completion_tokens"):
        _positive_int(body, field, MAX_OUTPUT_TOKENS)
    n = _positive_int(body, "n", MAX_CHOICES) or 1
    return n, requested_output_tokens(body)


def parse_chat(request: web.Request, body: dict[str, Any]) -> PaidRequest:
    model, price = _model_price(request, body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ApiError("invalid_request", "'messages' must be a non-empty array of message objects.")
    n, wanted = _common(body)
    tools = body.get("tools") or body.get("functions")
    input_tokens = request.app[COUNTER].count_messages(model, messages, tools=tools)
    per_choice = wanted or request.app[SETTINGS].default_max_tokens
    return PaidRequest("/chat/completions", body, model, price, input_tokens, n, per_choice)


def parse_legacy(request: web.Request, body: dict[str, Any]) -> PaidRequest:
    model, price = _model_price(request, body)
    prompt = body.get("prompt")
    if not isinstance(prompt, (str, list)) or (isinstance(prompt, list) and not prompt):
        raise ApiError("invalid_request", "'prompt' must be a string or a non-empty array.")
    n, wanted = _common(body)
    best_of = _positive_int(body, "best_of", MAX_CHOICES) or 1
    input_tokens = request.app[COUNTER].count_prompt(model, prompt)
    prompts = len(prompt) if isinstance(prompt, list) and not all(isinstance(p, int) for p in prompt) else 1
    return PaidRequest(
        "/completions", body, model, price, input_tokens, max(n, best_of) * prompts, wanted or LEGACY_DEFAULT_MAX_TOKENS
    )


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, parse_chat(request, await read_json_object(request)))


async def completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, parse_legacy(request, await read_json_object(request)))


async def _serve(request: web.Request, paid: PaidRequest) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    plan = ReservationPlan(
        paid.price,
        paid.input_tokens,
        paid.per_choice_tokens * paid.choices,
        min(settings.min_output_tokens, paid.per_choice_tokens) * paid.choices,
    )
    authorized = await request.app[GATE].authorize(
        request.headers.get("X-DRAIN-Voucher"), plan, endpoint=paid.endpoint, model=paid.model
    )
    upstream = request.app[UPSTREAM]
    body = upstream_body(paid.body, authorized.reservation.output_tokens // paid.choices, upstream.max_tokens_field)
    if paid.stream:
        return await _serve_stream(request, paid, authorized, body)
    return await _serve_json(request, paid, authorized, body)


async def _interrupted(request: web.Request, paid: PaidRequest, reservation: Reservation, output_tokens: int) -> None:
    """The handler was cancelled: the client went away, or the server is stopping.

    A client that leaves pays for what reached it: the input the upstream processed and the
    output tokens written to it. A server that stops charges nothing: that is our doing."""
    gate = request.app[GATE]
    if request.app[STOPPING].is_set():
        await gate.release(reservation, "interrupted by shutdown")
        return
    settlement = await gate.settle(
        reservation,
        price_cost=cost(paid.price, paid.input_tokens, output_tokens),
        input_tokens=paid.input_tokens,
        output_tokens=output_tokens,
        status="partial",
        usage_source="local",
    )
    log.info(
        "client_left channel=%s model=%s out=%d cost=%d",
        reservation.channel_id,
        paid.model,
        output_tokens,
        settlement.cost,
    )


async def _upstream_failed(request: web.Request, reservation: Reservation, exc: UpstreamError) -> ApiError:
    """The upstream failed before the client got anything: release, charge nothing."""
    await request.app[GATE].release(reservation, exc.message)
    return ApiError("upstream_error", exc.message, status=exc.status)


def _log_paid(channel_id: str, paid: PaidRequest, usage: Usage, settlement: Settlement, ending: str = "") -> None:
    log.info(
        "paid channel=%s model=%s in=%d out=%d cost=%d total=%d source=%s%s",
        channel_id,
        paid.model,
        usage.input_tokens,
        usage.output_tokens,
        settlement.cost,
        settlement.total,
        usage.source,
        f" stream={ending}" if ending else "",
    )


async def _serve_json(
    request: web.Request, paid: PaidRequest, authorized: Authorization, body: dict[str, Any]
) -> web.StreamResponse:
    gate = request.app[GATE]
    voucher, reservation = authorized.voucher, authorized.reservation
    try:
        answer = await request.app[UPSTREAM].post_json(paid.endpoint, body)
        await authorized.durable  # long done, unless the disk is slow: the answer waits for it
        usage = response_usage(answer.data, request.app[COUNTER], paid.model, paid.input_tokens)
        settlement = await gate.settle(
            reservation,
            price_cost=cost(paid.price, usage.input_tokens, usage.output_tokens),
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            usage_source=usage.source,
        )
    except UpstreamError as exc:
        raise await _upstream_failed(request, reservation, exc) from None
    except asyncio.CancelledError:
        await _interrupted(request, paid, reservation, output_tokens=0)
        raise
    except BaseException:
        await gate.release(reservation, "internal error")  # a no-op if the settle happened
        raise
    _log_paid(voucher.channel_id, paid, usage, settlement)
    headers = {
        "X-DRAIN-Cost": str(settlement.cost),
        "X-DRAIN-Total": str(settlement.total),
        "X-DRAIN-Remaining": str(settlement.remaining),
        "X-DRAIN-Channel": voucher.channel_id,
    }
    return web.Response(body=answer.body, content_type="application/json", headers=headers)


async def _serve_stream(
    request: web.Request, paid: PaidRequest, authorized: Authorization, body: dict[str, Any]
) -> web.StreamResponse:
    """Relay an SSE stream. The client's own stream_options decide whether it sees the usage
    chunk; upstream we always ask for it, since it is what we bill on."""
    gate = request.app[GATE]
    voucher, reservation = authorized.voucher, authorized.reservation
    options = paid.body.get("stream_options") or {}
    client_wants_usage = bool(options.get("include_usage"))
    body = {**body, "stream_options": {**options, "include_usage": True}}
    try:
        upstream_response = await request.app[UPSTREAM].open_stream(paid.endpoint, body)
    except UpstreamError as exc:
        raise await _upstream_failed(request, reservation, exc) from None
    except BaseException:
        await gate.release(reservation, "interrupted before the upstream answered")
        raise
    try:
        await authorized.durable  # before the first byte reaches the client
    except BaseException:
        upstream_response.close()
        await gate.release(reservation, "interrupted while the voucher was stored")
        raise
    relay = StreamRelay(
        request,
        upstream_response,
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # nginx and friends: do not hold events back
            "X-DRAIN-Channel": voucher.channel_id,
            "X-DRAIN-Reserved": str(reservation.amount),
        },
        encoding=request.app[COUNTER].encoding(paid.model),
        budget=StreamBudget(paid.price, paid.input_tokens, reservation.amount),
        client_wants_usage=client_wants_usage,
        chat=paid.endpoint == "/chat/completions",
    )
    try:
        ending = await relay.run()
        if ending == "budget":
            log.info("stream_budget_stop channel=%s delivered_tokens=%d", voucher.channel_id, relay.delivered_tokens)
            upstream_response.close()  # the upstream sees the disconnect and stops generating
            await relay.stop_for_budget(paid.input_tokens)
        usage = relay.upstream_usage
        if usage is None or ending != "done" or relay.malformed_events:
            usage = Usage(paid.input_tokens, relay.delivered_tokens, "local")
        settlement = await gate.settle(
            reservation,
            price_cost=cost(paid.price, usage.input_tokens, usage.output_tokens),
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            status=_STREAM_STATUS[relay.ending],
            usage_source=usage.source,
        )
    except UpstreamError as exc:  # before the first event: the client still gets plain JSON
        raise await _upstream_failed(request, reservation, exc) from None
    except asyncio.CancelledError:
        await _interrupted(request, paid, reservation, relay.delivered_tokens)
        raise
    except BaseException:
        await gate.release(reservation, "internal error")
        raise
    finally:
        upstream_response.close()
    _log_paid(voucher.channel_id, paid, usage, settlement, relay.ending)
    if relay.ending != "client_gone":
        await relay.finish(cost=settlement.cost, total=settlement.total, remaining=settlement.remaining)
    return relay.response


_STREAM_STATUS = {"done": "ok", "budget": "budget_stop", "client_gone": "partial", "upstream_failed": "partial"}
