"""A paying client as the scenarios need it: one request with a real signed voucher, JSON or
streamed, over aiohttp, and a record of everything the client saw, so that the audit can hold
the ledger to it: which voucher was sent, whether the server accepted it (a 200: a JSON answer,
or a stream's headers), and the cost the server reported (X-DRAIN-Cost, a header or an SSE
comment line before [DONE]).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import aiohttp

from drain_provider.consumer import DrainConsumer
from drain_provider.protocol import Voucher

COST = "X-DRAIN-Cost"


@dataclass
class Outcome:
    """One paid request as the client saw it."""

    channel_id: str
    nonce: int
    amount: int
    stream: bool
    status: int | None = None  # None: no HTTP answer at all (refused, reset)
    accepted: bool = False  # a 200: the server took the voucher (a stream: its headers arrived)
    cost: int | None = None  # X-DRAIN-Cost as reported to the client, if it was
    complete: bool = False  # the answer arrived whole: the JSON body, or a stream's last event
    error: str | None = None
    latency: float = 0.0  # to the last byte


def chat_body(content: str, *, stream: bool, max_tokens: int) -> dict[str, object]:
    body: dict[str, object] = {
        "model": "demo",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
    }
    if stream:
        body["stream"] = True
    return body


def directive(**options: object) -> str:
    """A demo-upstream directive as the message text (see drain_provider/devtools/demo_upstream.py)."""
    return "!demo " + json.dumps(options)


async def send(
    session: aiohttp.ClientSession,
    url: str,
    voucher: Voucher,
    body: dict[str, object],
    *,
    timeout: float = 30.0,
) -> Outcome:
    """POST `body` to `url`/v1/chat/completions with `voucher`; never raises for what the server
    or the network does (that is what is being recorded)."""
    stream = bool(body.get("stream"))
    outcome = Outcome(voucher.channel_id, voucher.nonce, voucher.amount, stream)
    started = time.perf_counter()
    headers = {"Content-Type": "application/json", "X-DRAIN-Voucher": voucher.header_value()}
    try:
        async with session.post(
            f"{url}/v1/chat/completions",
            data=json.dumps(body),
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as resp:
            outcome.status = resp.status
            outcome.accepted = resp.status == 200
            if resp.status != 200 or not stream:
                await resp.read()
                if COST in resp.headers:
                    outcome.cost = int(resp.headers[COST])
                outcome.complete = True
            else:
                await _read_stream(resp, outcome)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        outcome.error = type(exc).__name__
    outcome.latency = time.perf_counter() - started
    return outcome


async def _read_stream(resp: aiohttp.ClientResponse, outcome: Outcome) -> None:
    """A stream's cost is a comment line before [DONE], or after an error event (which has no
    [DONE]): the stream is complete when either ending arrived with its figures."""
    errored = False
    async for line in resp.content:
        text = line.decode(errors="replace").strip()
        if text.startswith(f": {COST}:"):
            outcome.cost = int(text.split(":")[-1])
            outcome.complete = errored
        elif text == "event: error":
            errored = True
        elif text == "data: [DONE]":
            outcome.complete = True


def step_voucher(consumer: DrainConsumer, step: int) -> Voucher:
    """The next voucher as real clients sign it: the next nonce, the last amount plus an estimate
    of this request (docs/PROTOCOL.md, "How real clients behave"), so that it always covers the
    request whatever the client missed of the server's figures (a crash, a broken stream)."""
    return consumer.sign(min(consumer.amount + step, consumer.deposit))
