"""What one HTTP request was: the facts its access log line and its metrics are made of.

The access middleware (api/access.py) makes one `RequestInfo` per request and sets it as the
task's `CURRENT` for the handler's whole run; the parts that learn a fact fill it in where they
learn it: the gate the channel and a shadowed refusal, the charge the model, tokens and cost, the
upstream client the time to the answer's head, the relay the first content event. So a new paid
endpoint built on `PaymentGate` and `Charge` is logged and counted without a line of its own.
Outside a request (start-up probes, tests driving a module alone) `current()` is None and every
part skips it. Pure: imports nothing of ours.
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(slots=True, eq=False)  # eq=False: hashed by identity, kept in the set of requests in flight
class RequestInfo:
    request_id: str
    route: str  # the route's canonical path (never the raw path a client sent)
    started: float  # time.perf_counter() when the request reached us
    channel: str | None = None
    model: str | None = None  # a model the server sells (parsed requests only name those)
    input_tokens: int | None = None  # metered requests only, paid or free
    output_tokens: int | None = None
    cost: int | None = None  # base units charged; None when nothing was settled
    ending: str | None = None  # states.StreamEnding of a metered request
    shadowed: str | None = None  # the payment refusal code served anyway (PAYMENT_MODE=shadow)
    free: bool = False  # served without payment (shadow refusal, or PAYMENT_MODE=off)
    upstream_head: float | None = None  # seconds from the upstream call to its answer's head
    first_content: float | None = None  # perf_counter() when the first content event reached the client
    streaming: bool = False  # an event stream is being relayed to the client


CURRENT: ContextVar[RequestInfo | None] = ContextVar("drain_request", default=None)


def current() -> RequestInfo | None:
    """The request being handled by this task, if any."""
    return CURRENT.get()


def now() -> float:
    return time.perf_counter()
