"""The paid endpoints: POST /v1/chat/completions and POST /v1/completions, JSON or streamed.

A request costs the server in proportion to its body only once it has shown a voucher that may
pay for it (docs/PROTOCOL.md, "The order of the answers"):

1. the client's limit on refused payments (api/clients.py), before anything is read;
2. the voucher accepted by the gate (format, signature, channel, deposit, expiry; payments),
   from its header alone: the body of a request that cannot pay is never read;
3. the body, bounded in size and time, parsed and validated (api/body.py, openai_format): a bad
   body never touches the ledger;
4. the input counted: inline when the body is small, else on the counting threads, after a
   ledger read has refused what the reservation surely would (`PaymentGate.precheck`, with a
   lower bound of the input that costs no encoding);
5. the Charge (payments) takes the money: the handler only calls the upstream, relays, and
   reports the figures (headers for JSON, SSE comments before [DONE] for streams).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from aiohttp import web

from .. import openai_format, safejson
from ..openai_format import CompletionRequest, Usage
from ..payments import Charge
from ..pricing import ReservationPlan
from ..protocol import VOUCHER_HEADER, Voucher
from ..relay import StreamRelay
from ..states import StreamEnding, UsageSource
from .body import parse_json_object, read_body
from .clients import limit_payment_failures
from .state import COUNTER, COUNTING, GATE, SETTINGS, UPSTREAM

log = logging.getLogger(__name__)
routes = web.RouteTableDef()

# A body up to this size is counted on the event loop: well under a millisecond, less than a
# trip to a thread and back. A larger one is counted on the counting threads.
COUNT_ON_LOOP_BYTES = 8192


@routes.post("/v1/chat/completions")
@limit_payment_failures
async def chat_completions(request: web.Request) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    voucher = await request.app[GATE].accept(request.headers.get(VOUCHER_HEADER))
    raw = await read_body(request)
    paid = openai_format.parse_chat(
        parse_json_object(raw), settings.prices, default_max_tokens=settings.default_max_tokens
    )
    return await _serve(request, voucher, paid, len(raw))


@routes.post("/v1/completions")
@limit_payment_failures
async def completions(request: web.Request) -> web.StreamResponse:
    voucher = await request.app[GATE].accept(request.headers.get(VOUCHER_HEADER))
    raw = await read_body(request)
    paid = openai_format.parse_legacy(parse_json_object(raw), request.app[SETTINGS].prices)
    return await _serve(request, voucher, paid, len(raw))


async def _serve(
    request: web.Request, voucher: Voucher | None, paid: CompletionRequest, body_bytes: int
) -> web.StreamResponse:
    app = request.app
    charge = app[GATE].charge(
        voucher,
        await _plan(request, paid, voucher, body_bytes),
        encoding=app[COUNTER].encoding(paid.model),
        endpoint=paid.endpoint,
        model=paid.model,
    )
    if paid.stream:
        return await _serve_stream(request, paid, charge)
    return await _serve_json(request, paid, charge)


async def _plan(
    request: web.Request, paid: CompletionRequest, voucher: Voucher | None, body_bytes: int
) -> ReservationPlan:
    """The reservation plan, the input counted: what a paid request's counting costs must not
    hold up the event loop, nor be spent on a voucher that cannot pay for it."""
    app = request.app
    counter, min_output_tokens = app[COUNTER], app[SETTINGS].min_output_tokens
    if body_bytes <= COUNT_ON_LOOP_BYTES:
        return paid.plan(paid.input_tokens(counter), min_output_tokens)
    await app[GATE].precheck(voucher, paid.plan(paid.least_input_tokens(counter), min_output_tokens))
    input_tokens = await asyncio.get_running_loop().run_in_executor(app[COUNTING], paid.input_tokens, counter)
    return paid.plan(input_tokens, min_output_tokens)


def _figures(charge: Charge) -> dict[str, str]:
    """What the request cost and where the channel stands: headers, or SSE comment lines. None
    for a request served free (PAYMENT_MODE shadow or off): it has no channel to speak of."""
    settlement = charge.settlement
    if settlement is None:
        return {}
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
            relayed = _cut_at_budget(answer.data, reported, charge)
            charge.finish(StreamEnding.BUDGET, None)
    headers = _figures(charge)
    if charge.channel_id is not None:
        headers["X-DRAIN-Channel"] = charge.channel_id
    return web.Response(body=relayed, content_type="application/json", headers=headers)


def _cut_at_budget(data: dict[str, Any], reported: Usage | None, charge: Charge) -> bytes:
    """The answer as a model cut at max_tokens would have sent it: each choice's text cut to what
    the reservation pays for, finish_reason "length", and our own counts as its usage, which is
    what the request is charged on (as for a stream cut at the budget)."""
    meter = charge.meter
    assert meter.limit is not None and meter.tokens == 0  # with no limit, everything fits
    trimmed = openai_format.trim_completion(data, meter.encoding, meter.limit)
    meter.add(openai_format.generated_text(trimmed, "message"))
    trimmed["usage"] = openai_format.usage_object(Usage(charge.plan.input_tokens, meter.tokens, UsageSource.LOCAL))
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
            )
            ending = await relay.run()
            if ending is StreamEnding.BUDGET:
                response.close()
                await relay.stop_for_budget(charge.plan.input_tokens)
            charge.finish(ending, relay.upstream_usage)
    if ending is not StreamEnding.CLIENT_GONE:
        comments = [f"{name}: {value}" for name, value in _figures(charge).items()]
        await relay.finish(comments, charged=charge.charged)
    return relay.response
