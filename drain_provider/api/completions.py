"""The paid endpoints: POST /v1/chat/completions and POST /v1/completions, JSON or streamed.

A request is parsed and validated completely (openai_format) before its voucher is looked at,
so a bad body never touches the ledger. Then its Charge (payments) takes the money: the handler
only calls the upstream, relays, and reports the figures (headers for JSON, SSE comments before
[DONE] for streams).
"""

from __future__ import annotations

import contextlib
from typing import Any

from aiohttp import web

from .. import openai_format, safejson
from ..ledger import Settlement
from ..openai_format import CompletionRequest
from ..payments import Charge
from ..protocol import VOUCHER_HEADER
from ..relay import StreamRelay
from ..states import StreamEnding
from .errors import ApiError
from .state import COUNTER, GATE, SETTINGS, UPSTREAM

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


def _figures(settlement: Settlement | None) -> dict[str, str]:
    assert settlement is not None
    return {
        "X-DRAIN-Cost": str(settlement.cost),
        "X-DRAIN-Total": str(settlement.total),
        "X-DRAIN-Remaining": str(settlement.remaining),
    }


async def _serve_json(request: web.Request, paid: CompletionRequest, charge: Charge) -> web.StreamResponse:
    upstream = request.app[UPSTREAM]
    async with charge:
        body = paid.upstream_body(charge.output_tokens, upstream.max_tokens_field)
        answer = await upstream.post_json(paid.endpoint, body)
        await charge.committed()  # long done, unless the disk is slow: the answer waits for it
        reported = openai_format.reported_usage(answer.data)
        if reported is None:  # the answer's text is counted only when the upstream did not count it
            charge.meter.add(openai_format.generated_text(answer.data, "message"))
        charge.finish(StreamEnding.DONE, reported)
    headers = {**_figures(charge.settlement), "X-DRAIN-Channel": charge.channel_id}
    return web.Response(body=answer.body, content_type="application/json", headers=headers)


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
            )
            ending = await relay.run()
            if ending is StreamEnding.BUDGET:
                response.close()
                await relay.stop_for_budget(paid.input_tokens)
            charge.finish(ending, relay.upstream_usage)
    if ending is not StreamEnding.CLIENT_GONE:
        comments = [f"{name}: {value}" for name, value in _figures(charge.settlement).items()]
        await relay.finish(comments, charged=charge.charged)
    return relay.response
