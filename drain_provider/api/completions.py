"""The paid endpoints: POST /v1/chat/completions and POST /v1/completions, JSON or streamed.

A request is parsed and validated completely (openai_format) before its voucher is looked at,
so a bad body never touches the ledger. Then its Charge (payments) takes the money: the handler
only calls the upstream, relays, and reports the figures (headers for JSON, SSE comments before
[DONE] for streams).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from aiohttp import web

from .. import openai_format, safejson
from ..openai_format import CompletionRequest, Usage
from ..payments import Charge
from ..protocol import VOUCHER_HEADER
from ..relay import StreamRelay
from ..states import StreamEnding, UsageSource
from .errors import ApiError
from .state import COUNTER, GATE, SETTINGS, UPSTREAM

log = logging.getLogger(__name__)
routes = web.RouteTableDef()


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


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    body = await read_json_object(request)
    paid = openai_format.parse_chat(
        body, settings.prices, request.app[COUNTER], default_max_tokens=settings.default_max_tokens
    )
    return await _serve(request, paid)


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    body = await read_json_object(request)
    return await _serve(request, openai_format.parse_legacy(body, request.app[SETTINGS].prices, request.app[COUNTER]))


async def _serve(request: web.Request, paid: CompletionRequest) -> web.StreamResponse:
    app = request.app
    charge = app[GATE].charge(
        request.headers.get(VOUCHER_HEADER),
        paid.plan(app[SETTINGS].min_output_tokens),
        encoding=app[COUNTER].encoding(paid.model),
        endpoint=paid.endpoint,
        model=paid.model,
    )
    if paid.stream:
        return await _serve_stream(request, paid, charge)
    return await _serve_json(request, paid, charge)


def _figures(charge: Charge) -> dict[str, str]:
    """What the request cost and where the channel stands: headers, or SSE comment lines."""
    settlement = charge.settlement
    assert settlement is not None
    return {
        "X-DRAIN-Cost": str(settlement.cost),
        "X-DRAIN-Total": str(settlement.total),
        "X-DRAIN-Remaining": str(settlement.remaining),
        "X-DRAIN-Next-Min": str(charge.next_min),
    }


async def _serve_json(request: web.Request, paid: CompletionRequest, charge: Charge) -> web.StreamResponse:
    upstream = request.app[UPSTREAM]
    async with charge:
        body = paid.upstream_body(charge.output_tokens, upstream.max_tokens_field)
        answer = await upstream.post_json(paid.endpoint, body)
        await charge.committed()  # long done, unless the disk is slow: the answer waits for it
        relayed = answer.body
        reported = openai_format.reported_usage(answer.data)
        text = openai_format.generated_text(answer.data, "message")
        # The text must fit the reservation (a bytes bound first: most answers need no count); it
        # is metered, to be charged on, only when the upstream did not count it.
        fits = charge.meter.take(text) if reported is None else charge.meter.fits(text)
        if fits:
            charge.finish(StreamEnding.DONE, reported)
        else:  # the upstream ignored max_tokens: the answer is cut where the reservation ends
            relayed = _cut_at_budget(answer.data, reported, paid, charge)
            charge.finish(StreamEnding.BUDGET, None)
    headers = {**_figures(charge), "X-DRAIN-Channel": charge.channel_id}
    return web.Response(body=relayed, content_type="application/json", headers=headers)


def _cut_at_budget(data: dict[str, Any], reported: Usage | None, paid: CompletionRequest, charge: Charge) -> bytes:
    """The answer as a model cut at max_tokens would have sent it: each choice's text cut to what
    the reservation pays for, finish_reason "length", and our own counts as its usage, which is
    what the request is charged on (as for a stream cut at the budget)."""
    meter = charge.meter
    assert meter.limit is not None and meter.tokens == 0  # with no limit, everything fits
    trimmed = openai_format.trim_completion(data, meter.encoding, meter.limit)
    meter.add(openai_format.generated_text(trimmed, "message"))
    trimmed["usage"] = openai_format.usage_object(Usage(paid.input_tokens, meter.tokens, UsageSource.LOCAL))
    log.warning(
        "answer_cut_at_budget channel=%s reported_out=%s limit=%d delivered_out=%d",
        charge.channel_id,
        "none" if reported is None else reported.output_tokens,
        meter.limit,
        meter.tokens,
    )
    return safejson.dumps(trimmed)


async def _serve_stream(request: web.Request, paid: CompletionRequest, charge: Charge) -> web.StreamResponse:
    upstream = request.app[UPSTREAM]
    async with charge:
        body = paid.upstream_body(charge.output_tokens, upstream.max_tokens_field)
        response = await upstream.open_stream(paid.endpoint, body)
        with contextlib.closing(response):  # closing drops the upstream: it stops generating
            await charge.committed()  # before the first byte reaches the client
            relay = StreamRelay(
                request,
                response,
                headers={
                    "Content-Type": "text/event-stream",
                    "Cache-Control": "no-cache",
                    "X-Accel-Buffering": "no",  # nginx and friends: do not hold events back
                    "X-DRAIN-Channel": charge.channel_id,
                    "X-DRAIN-Reserved": str(charge.reserved),
                },
                meter=charge.meter,
                client_wants_usage=paid.client_wants_usage,
                chat=paid.chat,
                max_bytes=upstream.max_answer_bytes,
            )
            ending = await relay.run()
            if ending is StreamEnding.BUDGET:
                response.close()
                await relay.stop_for_budget(paid.input_tokens)
            charge.finish(ending, relay.upstream_usage)
    if ending is not StreamEnding.CLIENT_GONE:
        comments = [f"{name}: {value}" for name, value in _figures(charge).items()]
        await relay.finish(comments, charged=charge.charged)
    return relay.response
