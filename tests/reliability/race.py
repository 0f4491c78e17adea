"""Racing and duplicate vouchers: the same signed voucher sent many times at once, and several
clients holding one channel's key signing colliding nonces and amounts at the same moment.

    python -m tests.reliability.race --rounds 50

Invariants, from what clients were answered and from the ledger file:
- double acceptances: more than one 200 for one (channel, nonce), whatever the amounts, plus
  accepted vouchers in the ledger with an equal nonce;
- out of order: a channel's accepted vouchers, in the order stored, whose nonce does not go up
  or whose amount goes down;
- charged above signed: a channel charged more than the highest amount signed for it;
- vouchers lost (a 200 whose voucher the ledger lacks), and the ledger's books (audit.books).
"""

from __future__ import annotations

import argparse
import asyncio
import random
from collections import Counter
from typing import Any

import aiohttp

from drain_provider.consumer import DrainConsumer

from . import audit, report
from .paying import Outcome, chat_body, directive, send
from .rig import Rig, build

STEP = 2_000


def _body(rng: random.Random) -> dict[str, object]:
    """A request whose upstream takes a few ms, so that reservations overlap."""
    stream = rng.random() < 0.3
    content = directive(token_delay=0.002) if stream else directive(delay=rng.choice([0, 0.005, 0.02]))
    return chat_body(content, stream=stream, max_tokens=32)


async def duplicates(
    session: aiohttp.ClientSession, rig: Rig, consumer: DrainConsumer, rng: random.Random, copies: int
) -> list[Outcome]:
    """One voucher, `copies` times at once (each with its own body: a replay need not be exact)."""
    voucher = consumer.sign(consumer.amount + STEP)
    return list(await asyncio.gather(*(send(session, rig.url, voucher, _body(rng)) for _ in range(copies))))


async def collisions(
    session: aiohttp.ClientSession, rig: Rig, consumer: DrainConsumer, rng: random.Random, clients: int
) -> list[Outcome]:
    """`clients` holders of the channel's key, each signing a nonce within 3 of the next one and
    an amount a step around the last, all sent at once: equal nonces with unequal amounts, higher
    nonces with lower amounts, and so on."""
    base_nonce, base_amount = consumer.nonce, consumer.amount
    vouchers = [
        consumer.sign(max(base_amount + rng.choice([-STEP, 0, STEP, 2 * STEP]), 0), base_nonce + rng.randint(1, 3))
        for _ in range(clients)
    ]
    consumer.nonce, consumer.amount = base_nonce + 3, base_amount + 2 * STEP
    return list(await asyncio.gather(*(send(session, rig.url, v, _body(rng)) for v in vouchers)))


async def run(
    rounds: int,
    *,
    channels: int = 4,
    copies: int = 16,
    seed: int = 1,
    env: dict[str, str] | None = None,
    keep: bool = False,
) -> dict[str, Any]:
    rng = random.Random(seed)
    rig = await build(channels, env=env)
    outcomes: list[Outcome] = []
    highest: dict[str, int] = {}
    try:
        await rig.start_provider()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            for _ in range(rounds):
                batches = [duplicates(session, rig, c, rng, copies) for c in rig.consumers[: channels // 2]]
                batches += [collisions(session, rig, c, rng, copies // 4) for c in rig.consumers[channels // 2 :]]
                for batch in await asyncio.gather(*batches):
                    outcomes += batch
            highest = {c.channel_id: c.amount for c in rig.consumers}
        rig.stop_provider()
        accepted = Counter((o.channel_id, o.nonce) for o in outcomes if o.accepted)
        books = audit.books(rig)
        invariants = {
            "double_acceptances": sum(n - 1 for n in accepted.values())
            + books.pop("accepted_vouchers_with_equal_nonce"),
            "vouchers_out_of_order": _out_of_order(rig),
            "channels_charged_above_signed": audit.charged_above_signed(rig, highest),
            "vouchers_lost": audit.vouchers_lost(rig, outcomes),
            **books,
        }
        refusals = Counter(o.status for o in outcomes if not o.accepted)
        figures = {
            "requests": len(outcomes),
            "accepted": sum(accepted.values()),
            "refused_by_status": {str(status): n for status, n in sorted(refusals.items(), key=str)},
            "vouchers_stored": rig.query("SELECT COUNT(*) FROM vouchers")[0][0],
        }
        parameters = {"rounds": rounds, "channels": channels, "copies": copies, "seed": seed}
        return report.summary("race", parameters, invariants, figures)
    finally:
        await rig.close(keep=keep)


def _out_of_order(rig: Rig) -> int:
    """Stored vouchers (in the order stored, per channel) whose nonce is not above the one before,
    or whose amount is below it."""
    bad = 0
    last: dict[str, tuple[int, int]] = {}
    for row in rig.query("SELECT channel_id, nonce, amount FROM vouchers ORDER BY id"):
        nonce, amount = int(row["nonce"]), row["amount"]
        before = last.get(row["channel_id"])
        if before is not None and (nonce <= before[0] or amount < before[1]):
            bad += 1
        last[row["channel_id"]] = (nonce, amount)
    return bad


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        prog="python -m tests.reliability.race", description="Racing and duplicate vouchers."
    )
    parser.add_argument("--rounds", type=int, default=50, help="rounds of races per channel (default 50)")
    parser.add_argument("--channels", type=int, default=4, help="channels: half replay, half collide (default 4)")
    parser.add_argument("--copies", type=int, default=16, help="copies of a voucher sent at once (default 16)")
    report.main(
        parser, lambda a: run(a.rounds, channels=a.channels, copies=a.copies, seed=a.seed, env=a.env, keep=a.keep)
    )
