"""The steps every paid endpoint takes, in one place, before it calls its upstream.

In this order (docs/PROTOCOL.md, "The order of the answers"); the client's limit on refused
payments comes first, as the route's decorator (`clients.limit_payment_failures`):

1. the voucher accepted by the gate from its header alone (payments): the body of a request that
   cannot pay is never read;
2. the body, bounded in size and time (api/body.py), parsed as a JSON object;
3. the model looked up (one dict lookup, api/routing.py): sold, and on this endpoint's kind;
4. the body validated for the endpoint (`parse`, openai_format): a bad body never touches the ledger;
5. the input counted: inline when the body is small, else on the counting threads, after a
   ledger read has refused what the reservation surely would (`PaymentGate.precheck`);
6. the Charge made, to be entered with `async with` by the endpoint, which calls the upstream.

A new paid endpoint is a route decorated with `limit_payment_failures` whose handler calls
`begin(request, kind, parse)` and serves the `PaidCall` it returns.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from aiohttp import web

from .. import safejson
from ..catalog import Kind, ModelRoute
from ..openai_format import Usage
from ..payments import Charge
from ..pricing import ReservationPlan
from ..protocol import VOUCHER_HEADER, Voucher
from ..states import StreamEnding
from ..tokens import TokenCounter
from ..upstream import Upstream
from .body import parse_json_object, read_body
from .state import COUNTER, COUNTING, GATE, ROUTES, SETTINGS

# A body up to this size is counted on the event loop: well under a millisecond, less than a
# trip to a thread and back. A larger one is counted on the counting threads.
COUNT_ON_LOOP_BYTES = 8192


class PaidRequest(Protocol):
    """What the flow needs of a validated request (openai_format's request records)."""

    @property
    def endpoint(self) -> str: ...  # the path under the upstream's base URL, as the ledger records it

    def input_tokens(self, counter: TokenCounter) -> int: ...

    def least_input_tokens(self, counter: TokenCounter) -> int: ...

    def plan(self, input_tokens: int, min_output_tokens: int) -> ReservationPlan: ...


P = TypeVar("P", bound=PaidRequest)


@dataclass(frozen=True)
class PaidCall(Generic[P]):
    """A paid request ready to go upstream: enter `charge`, call `upstream`, finish the charge."""

    request: P
    route: ModelRoute
    upstream: Upstream
    charge: Charge
    asked: str  # the model name the client sent (a public name or an alias)


async def begin(request: web.Request, kind: Kind, parse: Callable[[dict[str, Any], ModelRoute, str], P]) -> PaidCall[P]:
    """Steps 1 to 6 above for an endpoint serving models of `kind`; `parse(body, route, asked)`
    validates the body (RequestError if it is bad). Raises PaymentError, ApiError or
    RequestError: the error middleware answers them."""
    app = request.app
    voucher = await app[GATE].accept(request.headers.get(VOUCHER_HEADER))
    raw = await read_body(request)
    body = parse_json_object(raw)
    route, upstream = app[ROUTES].find(body.get("model"), kind)
    asked: str = body["model"]
    paid = parse(body, route, asked)
    charge = app[GATE].charge(
        voucher,
        await _plan(request, paid, voucher, len(raw)),
        encoding=app[COUNTER].encoding(route.name),
        endpoint=paid.endpoint,
        model=route.name,
    )
    return PaidCall(paid, route, upstream, charge, asked)


async def _plan(request: web.Request, paid: PaidRequest, voucher: Voucher | None, body_bytes: int) -> ReservationPlan:
    """The reservation plan, the input counted: what a paid request's counting costs must not
    hold up the event loop, nor be spent on a voucher that cannot pay for it."""
    app = request.app
    counter, min_output_tokens = app[COUNTER], app[SETTINGS].min_output_tokens
    if body_bytes <= COUNT_ON_LOOP_BYTES:
        return paid.plan(paid.input_tokens(counter), min_output_tokens)
    await app[GATE].precheck(voucher, paid.plan(paid.least_input_tokens(counter), min_output_tokens))
    input_tokens = await asyncio.get_running_loop().run_in_executor(app[COUNTING], paid.input_tokens, counter)
    return paid.plan(input_tokens, min_output_tokens)


def figures(charge: Charge) -> dict[str, str]:
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


def answer_headers(charge: Charge) -> dict[str, str]:
    """The headers of a JSON answer: the figures and the channel, for a paid request."""
    headers = figures(charge)
    if charge.channel_id is not None:
        headers["X-DRAIN-Channel"] = charge.channel_id
    return headers


async def serve_json(call: PaidCall[Any], usage_of: Callable[[dict[str, Any]], Usage | None]) -> web.Response:
    """The whole of a JSON-only endpoint (embeddings, images): the upstream called inside the
    charge, the charge finished on what `usage_of` reads from the answer (None: the plan's own
    cost), the answer sent with its figures."""
    charge = call.charge
    async with charge:
        answer = await call.upstream.post_json(
            call.request.endpoint, call.request.upstream_body(call.route.upstream_model)
        )
        await charge.committed()
        charge.finish(StreamEnding.DONE, usage_of(answer.data))
    return web.Response(
        body=public_answer(answer.data, answer.body, call),
        content_type="application/json",
        headers=answer_headers(charge),
    )


def public_answer(data: dict[str, Any], raw: bytes, call: PaidCall[Any]) -> bytes:
    """The upstream's answer as the client sends it: its `model` is the name the client asked
    for (an alias, or a name the upstream knows otherwise, is not replaced by the upstream's)."""
    if call.asked == call.route.upstream_model or "model" not in data or data["model"] == call.asked:
        return raw
    return safejson.dumps({**data, "model": call.asked})
