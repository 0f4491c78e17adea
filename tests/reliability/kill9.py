"""kill -9 under load: concurrent paying clients (JSON answers and streams, real signed
vouchers, one channel each), the provider SIGKILLed at a random moment of every round, started
again on the same ledger, and the clients carrying on. The claimer runs all along (a low
threshold, a short interval), so kills land in claims too.

    python -m tests.reliability.kill9 --rounds 20

Invariants, from the ledger file and the chain after the last round:
- vouchers lost: a client was answered 200 (a JSON answer or a stream's headers), and the ledger
  does not hold its voucher, or holds a lower amount;
- reservations left: usage rows still `reserved` once a restarted server listens, or any
  reservation at the end;
- claims duplicated: a claim transaction for a (channel, amount) already sent; channels whose
  claimed total on chain differs from the ledger's, or whose ChannelClaimed events are not its
  confirmed claims rows;
- charged above signed: a channel charged more than its client ever signed;
- and the ledger's books (audit.books): charges are the sum of their requests' costs, no request
  charged and released, one request per voucher, no two accepted vouchers with one nonce.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from typing import Any

import aiohttp

from bench.harness import percentile
from drain_provider.consumer import DrainConsumer

from . import audit, report
from .paying import Outcome, chat_body, directive, send, step_voucher
from .rig import Rig, build

STEP = 2_000  # what a client adds to its cumulative amount per request (a request costs about 150)
CLAIMS = {"CLAIM_INTERVAL": "0.5", "CLAIM_THRESHOLD": "300", "GAS_TOKEN_PRICE": "0", "CLAIM_RETRY_SECONDS": "1"}


async def lane(
    session: aiohttp.ClientSession,
    rig: Rig,
    consumer: DrainConsumer,
    rng: random.Random,
    up: asyncio.Event,
    done: asyncio.Event,
    outcomes: list[Outcome],
) -> None:
    """One client: requests one after another, waiting while the server is down."""
    while not done.is_set():
        await up.wait()
        stream = rng.random() < 0.5
        # A stream of about 40 tokens 10 ms apart, or an upstream that takes a while before its
        # JSON answer: a kill often lands mid-stream, or between a reservation and its settle.
        delay = rng.choice([0, 0, 0.02, 0.1])
        content = directive(token_delay=0.01) if stream else directive(delay=delay)
        body = chat_body(content, stream=stream, max_tokens=rng.randint(16, 64))
        outcome = await send(session, rig.url, step_voucher(consumer, STEP), body)
        outcomes.append(outcome)
        if outcome.status is None:
            await asyncio.sleep(0.01)  # the server is down: `up` is cleared, or is about to be


async def run(
    rounds: int, *, clients: int = 8, seed: int = 1, env: dict[str, str] | None = None, keep: bool = False
) -> dict[str, Any]:
    rng = random.Random(seed)
    rig = await build(clients, env={"LOG_LEVEL": "INFO", **CLAIMS, **(env or {})})
    outcomes: list[Outcome] = []
    left_at_restart = 0
    restarts: list[float] = []
    try:
        await rig.start_provider()
        up, done = asyncio.Event(), asyncio.Event()
        up.set()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as session:
            lanes = [
                asyncio.create_task(lane(session, rig, c, random.Random(f"{seed}-{i}"), up, done, outcomes))
                for i, c in enumerate(rig.consumers)
            ]
            for _ in range(rounds):
                await asyncio.sleep(rng.uniform(0.3, 1.5))
                up.clear()
                rig.kill_provider()
                started = time.perf_counter()
                await rig.start_provider()
                restarts.append(time.perf_counter() - started)
                left_at_restart += audit.reserved_rows(rig)
                up.set()
            await asyncio.sleep(1.0)  # a last stretch of load with no kill
            done.set()
            await asyncio.gather(*lanes)
        rig.kill_provider()  # a last kill, then a start that only finishes what was left
        await rig.start_at_rest()
        left_at_restart += audit.reserved_rows(rig)
        rig.stop_provider()
        return await _result(rig, outcomes, left_at_restart, restarts, rounds=rounds, clients=clients, seed=seed)
    finally:
        await rig.close(keep=keep)


async def _result(
    rig: Rig, outcomes: list[Outcome], left_at_restart: int, restarts: list[float], **parameters: Any
) -> dict[str, Any]:
    books = audit.books(rig)
    claims, claim_figures = await audit.claims(rig)
    signed = {c.channel_id: c.amount for c in rig.consumers}
    invariants = {
        "vouchers_lost": audit.vouchers_lost(rig, outcomes),
        "reservations_left": left_at_restart + books.pop("usage_rows_reserved") + books.pop("channels_reserved_not_0"),
        **claims,
        "channels_charged_above_signed": audit.charged_above_signed(rig, signed),
        **books,
    }
    accepted = [o for o in outcomes if o.accepted]
    figures = {
        "requests": len(outcomes),
        "accepted": len(accepted),
        "accepted_streams": sum(o.stream for o in accepted),
        "accepted_cut_by_kill": sum(not o.complete for o in accepted),
        "no_answer": sum(o.status is None for o in outcomes),
        "usage_rows_abandoned": rig.query("SELECT COUNT(*) FROM usage WHERE status = 'abandoned'")[0][0],
        "charged_total": rig.query("SELECT COALESCE(SUM(charged), 0) FROM channels")[0][0],
        **claim_figures,
        "claims_reconciled_after_restart": rig.log_text().count("claim_reconciling"),
        "restart_to_listening_s_p50": round(percentile(restarts, 0.5), 2) if restarts else None,
    }
    return report.summary("kill9", parameters, invariants, figures)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m tests.reliability.kill9", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20, help="kills (default 20)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients, one channel each (default 8)")
    report.main(parser, lambda a: run(a.rounds, clients=a.clients, seed=a.seed, env=a.env, keep=a.keep))
