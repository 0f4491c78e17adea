"""The paid endpoints: POST /v1/chat/completions and POST /v1/completions.

A request is validated completely before the voucher is looked at, so a bad body never touches
the ledger. Then: reserve (PaymentGate.authorize), call the upstream with the output limit the
reservation pays for, settle on the reported usage, answer with the X-DRAIN-* figures. Every
path after the reservation ends in exactly one settle or release.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .. import safejson
from ..pricing import ModelPrice, ReservationPlan, cost
from ..relay import requested_output_tokens, response_usage, upstream_body
from ..upstream import UpstreamError
from .errors import ApiError
from .state import COUNTER, GATE, SETTINGS, UPSTREAM

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
    if body.get("stream"):
        raise ApiError("invalid_request", "Streaming is not available on this provider yet; send stream=false.")
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
    gate = request.app[GATE]
    upstream = request.app[UPSTREAM]
    plan = ReservationPlan(
        paid.price,
        paid.input_tokens,
        paid.per_choice_tokens * paid.choices,
        min(settings.min_output_tokens, paid.per_choice_tokens) * paid.choices,
    )
    voucher, reservation = await gate.authorize(
        request.headers.get("X-DRAIN-Voucher"), plan, endpoint=paid.endpoint, model=paid.model
    )
    try:
        body = upstream_body(paid.body, reservation.output_tokens // paid.choices, upstream.max_tokens_field)
        answer = await upstream.post_json(paid.endpoint, body)
        usage = response_usage(answer.data, request.app[COUNTER], paid.model, paid.input_tokens)
        settlement = await gate.settle(
            reservation,
            price_cost=cost(paid.price, usage.input_tokens, usage.output_tokens),
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            usage_source=usage.source,
        )
    except UpstreamError as exc:
        await gate.release(reservation, exc.message)
        raise ApiError("upstream_error", exc.message, status=exc.status) from None
    except BaseException:
        # Cancelled or failed before the charge was booked: free the reservation (a no-op if
        # the settle did happen).
        await gate.release(reservation, "interrupted")
        raise
    log.info(
        "paid channel=%s model=%s in=%d out=%d cost=%d total=%d source=%s",
        voucher.channel_id,
        paid.model,
        usage.input_tokens,
        usage.output_tokens,
        settlement.cost,
        settlement.total,
        usage.source,
    )
    headers = {
        "X-DRAIN-Cost": str(settlement.cost),
        "X-DRAIN-Total": str(settlement.total),
        "X-DRAIN-Remaining": str(settlement.remaining),
        "X-DRAIN-Channel": voucher.channel_id,
    }
    return web.Response(body=answer.body, content_type="application/json", headers=headers)
