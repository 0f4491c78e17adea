"""Several instances on one PostgreSQL ledger: three provider processes share a database; clients
send each request to the next instance in turn, with racing vouchers on shared channels; then
the instance that claims is SIGKILLed while streams are in flight on it.

    python -m tests.reliability.instances --rounds 20

A real PostgreSQL server is started for the run (bench/postgres_server.py: the server binaries
must be installed), or DRAIN_TEST_DATABASE_URL's is used.

Invariants (from the database and the chain, as in race and kill9):
- double acceptances: more than one 200 for one (channel, nonce) across all instances, and
  accepted vouchers in the ledger with an equal nonce;
- charged above signed, vouchers lost, the ledger's books (audit.books);
- reservations of the killed instance still held after INSTANCE_TIMEOUT and a reaping period;
- no leader after the kill (no other instance took the claimer over);
- refused by the living instances after the kill: a request to a living instance that was not
  answered 200 (each carries a voucher that covers it);
- claims duplicated, chain ≠ ledger (audit.claims), once the run is at rest.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections import Counter
from typing import Any

import aiohttp

from bench.harness import Server, free_port, wait_for_port
from bench.postgres_server import running_server
from drain_provider.consumer import DrainConsumer

from . import audit, report
from .paying import Outcome, chat_body, directive, send, step_voucher
from .rig import Rig, build, spawn

STEP = 2_000
INSTANCE_TIMEOUT = 3.0
CLAIMS = {"CLAIM_INTERVAL": "0.5", "CLAIM_THRESHOLD": "300", "GAS_TOKEN_PRICE": "0", "CLAIM_RETRY_SECONDS": "1"}


class Instances:
    """The provider processes of a run, each on its own port and log, all on the rig's ledger."""

    def __init__(self, rig: Rig, count: int) -> None:
        self.rig = rig
        self.ports = [rig.port] + [free_port() for _ in range(count - 1)]
        self.servers: list[Server | None] = [None] * count

    def url(self, index: int) -> str:
        return f"http://127.0.0.1:{self.ports[index]}"

    def alive(self) -> list[int]:
        return [i for i, s in enumerate(self.servers) if s is not None and s.proc.poll() is None]

    async def start(self, index: int) -> None:
        env = {**self.rig.env, "PORT": str(self.ports[index])}
        proc = spawn([sys.executable, "-m", "drain_provider"], self.rig.workdir / f"provider-{index}.log", env)
        self.servers[index] = Server(f"drain-provider-{index}", proc, self.ports[index])
        await asyncio.to_thread(wait_for_port, self.ports[index], proc, 60)

    def kill(self, index: int) -> None:
        server = self.servers[index]
        assert server is not None
        server.proc.kill()
        server.proc.wait()

    def stop_all(self) -> None:
        for server in self.servers:
            if server is not None and server.proc.poll() is None:
                server.stop()

    async def health(self, session: aiohttp.ClientSession, index: int) -> dict[str, Any]:
        async with session.get(f"{self.url(index)}/health") as resp:
            return dict(await resp.json())

    async def leader(self, session: aiohttp.ClientSession, among: list[int], timeout: float) -> int | None:
        """The instance among `among` that says it leads the claims, waiting up to `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for index in among:
                if (await self.health(session, index)).get("leader"):
                    return index
            await asyncio.sleep(0.1)
        return None


def _body(rng: random.Random, *, stream: bool | None = None) -> dict[str, object]:
    stream = rng.random() < 0.3 if stream is None else stream
    content = directive(token_delay=0.002) if stream else directive(delay=rng.choice([0, 0.005, 0.02]))
    return chat_body(content, stream=stream, max_tokens=32)


async def race_round(
    session: aiohttp.ClientSession, fleet: Instances, consumer: DrainConsumer, rng: random.Random, copies: int
) -> list[Outcome]:
    """One voucher sent `copies` times at once, each copy to the next instance; then colliding
    vouchers (nonces within 3 of the next one, amounts a step around the last) the same way."""
    targets = fleet.alive()
    voucher = consumer.sign(consumer.amount + STEP)
    sends = [send(session, fleet.url(targets[k % len(targets)]), voucher, _body(rng)) for k in range(copies)]
    outcomes = list(await asyncio.gather(*sends))
    base_nonce, base_amount = consumer.nonce, consumer.amount
    colliding = [
        consumer.sign(max(base_amount + rng.choice([-STEP, 0, STEP, 2 * STEP]), 0), base_nonce + rng.randint(1, 3))
        for _ in range(copies)
    ]
    consumer.nonce, consumer.amount = base_nonce + 3, base_amount + 2 * STEP
    sends = [send(session, fleet.url(targets[k % len(targets)]), v, _body(rng)) for k, v in enumerate(colliding)]
    return outcomes + list(await asyncio.gather(*sends))


async def lane(
    session: aiohttp.ClientSession,
    fleet: Instances,
    consumer: DrainConsumer,
    rng: random.Random,
    start_at: int,
    done: asyncio.Event,
    outcomes: list[tuple[int, Outcome, float]],
) -> None:
    """One client sending its requests one after another to the next living instance in turn;
    each outcome with the instance asked and when the answer ended (time.monotonic)."""
    turn = start_at
    while not done.is_set():
        alive = fleet.alive()
        index = alive[turn % len(alive)]
        turn += 1
        body = _body(rng, stream=rng.random() < 0.5)
        outcome = await send(session, fleet.url(index), step_voucher(consumer, STEP), body)
        outcomes.append((index, outcome, time.monotonic()))


async def run(
    rounds: int,
    *,
    instances: int = 3,
    channels: int = 4,
    copies: int = 6,
    seed: int = 1,
    env: dict[str, str] | None = None,
    keep: bool = False,
) -> dict[str, Any]:
    rng = random.Random(seed)
    with running_server() as postgres:
        url = await postgres.create_database()
        # The racing vouchers are refused by the hundred, all from one address: with the limit on
        # refused payments, the clients' good vouchers would then get 429s too (as in race.py).
        settings = {
            "DATABASE_URL": url,
            "INSTANCE_TIMEOUT": str(INSTANCE_TIMEOUT),
            "PAYMENT_FAILURES_PER_MINUTE": "0",
            **CLAIMS,
            **(env or {}),
        }
        rig = await build(channels, env=settings)
        fleet = Instances(rig, instances)
        try:
            return await _run(rig, fleet, rng, rounds, copies, keep=keep, instances=instances, seed=seed)
        finally:
            fleet.stop_all()
            await rig.close(keep=keep)


async def _run(
    rig: Rig, fleet: Instances, rng: random.Random, rounds: int, copies: int, **parameters: Any
) -> dict[str, Any]:
    outcomes: list[Outcome] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        # The first instance is started alone, so that it takes the claimer's part.
        await fleet.start(0)
        first_leader = await fleet.leader(session, [0], timeout=15)
        await asyncio.gather(*(fleet.start(i) for i in range(1, len(fleet.ports))))
        ids = [(await fleet.health(session, i)).get("instance") for i in range(len(fleet.ports))]

        # 1. Racing vouchers across instances.
        for _ in range(rounds):
            for batch in await asyncio.gather(*(race_round(session, fleet, c, rng, copies) for c in rig.consumers)):
                outcomes += batch

        # 2. Every client streams and asks round-robin; the claimer's instance is killed mid-way.
        done = asyncio.Event()
        served: list[tuple[int, Outcome, float]] = []
        lanes = [
            asyncio.create_task(lane(session, fleet, c, rng, i, done, served)) for i, c in enumerate(rig.consumers)
        ]
        await asyncio.sleep(rng.uniform(0.5, 1.0))
        victim = 0
        reserved_at_kill = rig.query(
            "SELECT COUNT(*) FROM usage WHERE status = 'reserved' AND instance = ?", (ids[victim],)
        )[0][0]
        fleet.kill(victim)
        killed_at = time.monotonic()
        survivors = fleet.alive()
        new_leader = await fleet.leader(session, survivors, timeout=INSTANCE_TIMEOUT * 5)
        leader_after = time.monotonic() - killed_at
        released_after = None
        while time.monotonic() - killed_at < INSTANCE_TIMEOUT * 5:
            held = rig.query("SELECT COUNT(*) FROM usage WHERE status = 'reserved' AND instance = ?", (ids[victim],))
            if held[0][0] == 0:
                released_after = time.monotonic() - killed_at
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # the survivors keep serving the clients a while longer
        done.set()
        await asyncio.gather(*lanes)
        fleet.stop_all()
        outcomes += [o for _, o, _ in served]

    after_kill = [o for index, o, ended in served if ended > killed_at and index != victim]
    refused_by_survivors = sum(1 for index, o, _ in served if index in survivors and not o.accepted)
    await rig.start_at_rest()
    rig.stop_provider()
    highest = {c.channel_id: c.amount for c in rig.consumers}
    accepted = Counter((o.channel_id, o.nonce) for o in outcomes if o.accepted)
    books = audit.books(rig)
    claims, claim_figures = await audit.claims(rig)
    invariants = {
        "double_acceptances": sum(n - 1 for n in accepted.values()) + books.pop("accepted_vouchers_with_equal_nonce"),
        "channels_charged_above_signed": audit.charged_above_signed(rig, highest),
        "vouchers_lost": audit.vouchers_lost(rig, outcomes),
        "killed_instance_reservations_held": 0 if released_after is not None else 1,
        "no_leader_after_kill": 0 if new_leader is not None else 1,
        "refused_by_living_instances": refused_by_survivors,
        **books,
        **claims,
    }
    by_instance = Counter(row[0] for row in rig.query("SELECT instance FROM usage WHERE status != 'failed'"))
    refusals = Counter(o.status for o in outcomes if not o.accepted)
    figures = {
        "requests": len(outcomes),
        "accepted": sum(accepted.values()),
        "refused_by_status": {str(status): n for status, n in sorted(refusals.items(), key=str)},
        "answered_200_after_kill_by_survivors": sum(1 for o in after_kill if o.accepted),
        "first_leader": first_leader,
        "leader_after_kill": new_leader,
        "seconds_to_new_leader": round(leader_after, 2),
        "reserved_on_killed_instance_at_kill": reserved_at_kill,
        "seconds_to_release_its_reservations": None if released_after is None else round(released_after, 2),
        "usage_rows_by_instance": sorted(by_instance.values(), reverse=True),
        **claim_figures,
    }
    return report.summary("instances", {"rounds": rounds, "copies": copies, **parameters}, invariants, figures)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        prog="python -m tests.reliability.instances",
        description="Three provider instances on one PostgreSQL ledger: racing vouchers, one instance killed.",
    )
    parser.add_argument("--rounds", type=int, default=20, help="rounds of racing vouchers per channel (default 20)")
    parser.add_argument("--instances", type=int, default=3, help="provider processes (default 3)")
    parser.add_argument("--copies", type=int, default=6, help="copies of a voucher sent at once (default 6)")
    report.main(
        parser,
        lambda a: run(a.rounds, instances=a.instances, copies=a.copies, seed=a.seed, env=a.env, keep=a.keep),
    )
