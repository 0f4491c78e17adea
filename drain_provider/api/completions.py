"""The paid endpoints: POST /v1/chat/completions and POST /v1/completions, JSON or streamed.

A request costs the server in proportion to its body only once it has shown a voucher that may
pay for it: the steps before the upstream call are api/paid.py's `begin`, shared by every paid
endpoint. Here the Charge (payments) takes the money: the handler only calls the model's
upstream (its name there in the body), relays, and reports the figures (headers for JSON, SSE
comments before [DONE] for streams).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from aiohttp import web

from .. import openai_format, safejson
from ..catalog import Kind, ModelRoute
from ..openai_format import CompletionRequest, Usage
from ..relay import StreamRelay
from ..states import StreamEnding, UsageSource
from .clients import limit_payment_failures
from .paid import PaidCall, answer_headers, begin, figures, public_answer
from .state import SETTINGS

log = logging.getLogger(__name__)
routes = web.RouteTableDef()


@routes.post("/v1/chat/completions")
@limit_payment_failures
async def chat_completions(request: web.Request) -> web.StreamResponse:
    default_max_tokens = request.app[SETTINGS].default_max_tokens

    def parse(body: dict[str, Any], route: ModelRoute, asked: str) -> CompletionRequest:
        return openai_format.chat_request(
            body, asked, route.price, default_max_tokens=default_max_tokens, markup=route.markup_ratio
        )

    return await _serve(request, await begin(request, Kind.CHAT, parse))


@routes.post("/v1/completions")
@limit_payment_failures
async def completions(request: web.Request) -> web.StreamResponse:
    def parse(body: dict[str, Any], route: ModelRoute, asked: str) -> CompletionRequest:
        return openai_format.legacy_request(body, asked, route.price, markup=route.markup_ratio)

    return await _serve(request, await begin(request, Kind.CHAT, parse))


async def _serve(request: web.Request, call: PaidCall[CompletionRequest]) -> web.StreamResponse:
    if call.request.stream:
        return await _serve_stream(request, call)
    return await _serve_json(call)


async def _serve_json(call: PaidCall[CompletionRequest]) -> web.StreamResponse:
    paid, upstream, charge = call.request, call.upstream, call.charge
    async with charge:
        body = paid.upstream_body(charge.output_tokens, upstream.max_tokens_field, call.route.upstream_model)
        answer = await upstream.post_json(paid.endpoint, body)
        await charge.committed()  # long done, unless the disk is slow: the answer waits for it
        relayed = public_answer(answer.data, answer.body, call)
        reported = openai_format.reported_usage(answer.data)
        text = openai_format.generated_text(answer.data, "message")
        # The text must fit the reservation (a bytes bound first: most answers need no count); it
        # is metered, to be charged on, only when the upstream did not count it.
        fits = charge.meter.take(text) if reported is None else charge.meter.fits(text)
        if fits:
            charge.finish(StreamEnding.DONE, reported)
        else:  # the upstream ignored max_tokens: the answer is cut where the reservation ends
            relayed = _cut_at_budget(answer.data, reported, call)
            charge.finish(StreamEnding.BUDGET, None)
    headers = answer_headers(charge)
    return web.Response(body=relayed, content_type="application/json", headers=headers)


def _cut_at_budget(data: dict[str, Any], reported: Usage | None, call: PaidCall[CompletionRequest]) -> bytes:
    """The answer as a model cut at max_tokens would have sent it: each choice's text cut to what
    the reservation pays for, finish_reason "length", and our own counts as its usage, which is
    what the request is charged on (as for a stream cut at the budget)."""
    charge = call.charge
    meter = charge.meter
    assert meter.limit is not None and meter.tokens == 0  # with no limit, everything fits
    trimmed = openai_format.trim_completion(data, meter.encoding, meter.limit)
    meter.add(openai_format.generated_text(trimmed, "message"))
    trimmed["usage"] = openai_format.usage_object(Usage(charge.plan.input_tokens, meter.tokens, UsageSource.LOCAL))
    if "model" in trimmed:
        trimmed["model"] = call.asked
    log.warning(
        "answer_cut_at_budget channel=%s reported_out=%s limit=%d delivered_out=%d",
        charge.channel_id,
        "none" if reported is None else reported.output_tokens,
        meter.limit,
        meter.tokens,
    )
    return safejson.dumps(trimmed)


async def _serve_stream(request: web.Request, call: PaidCall[CompletionRequest]) -> web.StreamResponse:
    paid, upstream, charge = call.request, call.upstream, call.charge
    async with charge:
        body = paid.upstream_body(charge.output_tokens, upstream.max_tokens_field, call.route.upstream_model)
        response = await upstream.open_stream(paid.endpoint, body)
        with contextlib.closing(response):  # closing drops the upstream: it stops generating
            await charge.committed()  # before the first byte reaches the client
            headers = {
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",  # nginx and friends: do not hold events back
            }
            if charge.paid:
                headers.update({"X-DRAIN-Channel": str(charge.channel_id), "X-DRAIN-Reserved": str(charge.reserved)})
            relay = StreamRelay(
                request,
                response,
                headers=headers,
                meter=charge.meter,
                client_wants_usage=paid.client_wants_usage,
                chat=paid.chat,
                max_bytes=upstream.max_answer_bytes,
                model=None if call.asked == call.route.upstream_model else call.asked,
            )
            ending = await relay.run()
            if ending is StreamEnding.BUDGET:
                response.close()
                await relay.stop_for_budget(charge.plan.input_tokens)
            charge.finish(ending, relay.upstream_usage)
    if ending is not StreamEnding.CLIENT_GONE:
        comments = [f"{name}: {value}" for name, value in figures(charge).items()]
        await relay.finish(comments, charged=charge.charged)
    return relay.response
