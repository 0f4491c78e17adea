"""The ledger's guarantees: vouchers are durable before the client gets a byte, every
reservation ends in exactly one settle or release, and a restart releases what a crash left.
Tests marked `both_engines` hold on SQLite and PostgreSQL; the others test SQLite's own means
(its writer thread, its file), and the `postgresql` ones the row locks several instances share."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import openai
import pytest
from helpers import ENGINES, ChannelFactory, Provider, ProviderFactory, Upstream, paid_chat, wait_for

from drain_provider.devtools.devchain import DevChain
from drain_provider.ledger import (
    MIGRATIONS,
    Ledger,
    LedgerMismatch,
    PostgresLedger,
    Refusal,
    Reservation,
    SQLiteLedger,
    make_ledger,
)
from drain_provider.ledger import postgres as postgres_engine
from drain_provider.ledger.postgres import MIGRATIONS as PG_MIGRATIONS
from drain_provider.pricing import ModelPrice, ReservationPlan
from drain_provider.protocol import ChannelState, Voucher
from drain_provider.states import UsageStatus

CHANNEL = "0x" + "cd" * 32
STATE = ChannelState(consumer="0x" + "11" * 20, provider="0x" + "22" * 20, deposit=1_000_000, claimed=0, expiry=2**40)
CONTRACT = "0x" + "33" * 20
PLAN = ReservationPlan(ModelPrice(1000, 2000), input_tokens=100, wanted_output_tokens=400, min_output_tokens=16)

both_engines = pytest.mark.parametrize("engine", ENGINES, indirect=True)
NewLedger = Callable[[], Awaitable[Ledger]]


def voucher(amount: int, nonce: int) -> Voucher:
    return Voucher(CHANNEL, amount, nonce, bytes(65))


async def reserve(ledger: Ledger, voucher: Voucher, plan: ReservationPlan = PLAN) -> Reservation:
    outcome = await ledger.authorize(voucher, plan, endpoint="/chat/completions", model="demo")
    assert isinstance(outcome, Reservation), outcome
    return outcome


async def open_ledger(path: Path) -> SQLiteLedger:
    ledger = SQLiteLedger(path)
    await ledger.open()
    return ledger


@both_engines
@pytest.mark.rule(4)
async def test_voucher_is_committed_before_the_client_gets_a_byte(
    provider: Provider, open_channel: ChannelFactory
) -> None:
    """docs/DESIGN.md rule 4. The upstream may be called while the voucher's transaction commits; the
    client is sent nothing before the commit."""
    consumer = await open_channel(provider)
    voucher = consumer.next_voucher(100_000)
    stream = await provider.client().chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": '!demo {"reply": "one two three four", "token_delay": 0.3}'}],
        stream=True,
        extra_headers={"X-DRAIN-Voucher": voucher.header_value()},
    )
    first = await stream.__anext__()
    assert first.choices
    # The stream is still running; another connection (the ledger's reads have their own; another
    # process, after a crash) already sees the voucher and the reservation.
    stored = await provider.ledger.fetchall(
        "SELECT amount, nonce FROM vouchers WHERE channel_id = ?", (consumer.channel_id,)
    )
    assert stored == [(consumer.amount, str(consumer.nonce))]
    reserved = await provider.ledger.fetchone(
        "SELECT reserved FROM channels WHERE channel_id = ?", (consumer.channel_id,)
    )
    assert reserved is not None and reserved[0] > 0
    async for _ in stream:
        pass
    record = await provider.ledger.get_channel(consumer.channel_id)
    assert record is not None and record.reserved == 0 and record.charged > 0


@pytest.mark.rule(4)
async def test_a_commit_that_fails_after_the_upstream_call_charges_nothing(
    provider: Provider, open_channel: ChannelFactory, upstream: Upstream
) -> None:
    """The voucher's COMMIT overlaps the upstream call. If it fails (a full disk, an I/O error),
    nothing was stored: the client gets an error, no answer, and is charged nothing."""
    consumer = await open_channel(provider)
    await paid_chat(provider.client(), consumer)  # the channel is known; one request is charged
    before = await provider.ledger.get_channel(consumer.channel_id)

    def poison(conn: sqlite3.Connection) -> None:
        # A foreign key checked only at COMMIT, violated by every new usage row: the
        # authorization's statements succeed and its COMMIT fails, as on a failing disk.
        conn.execute("CREATE TEMP TABLE parent (id INTEGER PRIMARY KEY)")
        conn.execute("CREATE TEMP TABLE child (id INTEGER REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED)")
        conn.execute(
            "CREATE TEMP TRIGGER poison AFTER INSERT ON main.usage BEGIN INSERT INTO child VALUES (NEW.id); END"
        )

    ledger = provider.ledger
    assert isinstance(ledger, SQLiteLedger)  # the failing COMMIT is made with SQLite's own means
    await ledger.write(poison)
    seen = len(upstream.stats.requests)
    for stream in (False, True):
        with pytest.raises(openai.InternalServerError) as caught:
            await paid_chat(provider.client(), consumer, stream=stream)
        assert caught.value.status_code == 500
        assert caught.value.response.headers["X-DRAIN-Error"] == "internal_error"
    assert len(upstream.stats.requests) == seen + 2  # the upstream was called both times
    after = await provider.ledger.get_channel(consumer.channel_id)
    assert after == before
    assert await provider.ledger.fetchone(
        "SELECT COUNT(*) FROM vouchers WHERE channel_id = ?", (consumer.channel_id,)
    ) == (1,)

    await ledger.write(lambda conn: conn.execute("DROP TRIGGER temp.poison"))
    await paid_chat(provider.client(), consumer)


@pytest.mark.rule(4)
async def test_a_restart_releases_reservations_left_by_a_crash(
    tmp_path: Path, provider_factory: ProviderFactory, chain: DevChain, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "crashed.db"
    ledger = await open_ledger(path)
    await ledger.add_channel(CHANNEL, STATE, contract=chain.contract)
    first = await reserve(ledger, voucher(50_000, 1))
    await ledger.settle(first, price_cost=900, input_tokens=100, output_tokens=400, status=UsageStatus.OK)
    await reserve(ledger, voucher(100_000, 2))
    await ledger.close()  # the process dies here, one request in flight

    with caplog.at_level(logging.WARNING):
        provider = await provider_factory(database_path=path)
    record = await provider.ledger.get_channel(CHANNEL)
    assert record is not None
    assert (record.reserved, record.charged, record.last_amount, record.last_nonce) == (0, 900, 100_000, 2)
    statuses = await provider.ledger.fetchall("SELECT status FROM usage ORDER BY id")
    assert statuses == [("ok",), ("abandoned",)]
    assert "reservations_released count=1" in caplog.text


@both_engines
async def test_settle_happens_once(new_ledger: NewLedger) -> None:
    ledger = await new_ledger()
    await ledger.add_channel(CHANNEL, STATE, contract=CONTRACT)
    reservation = await reserve(ledger, voucher(50_000, 1))
    first = await ledger.settle(reservation, price_cost=700, input_tokens=100, output_tokens=300, status=UsageStatus.OK)
    again = await ledger.settle(reservation, price_cost=5000, input_tokens=1, output_tokens=1, status=UsageStatus.OK)
    await ledger.release(reservation, error="late")
    assert again.cost == first.cost == 700
    record = await ledger.get_channel(CHANNEL)
    assert record is not None and (record.charged, record.reserved) == (700, 0)


@both_engines
@pytest.mark.rule(3)
async def test_charge_is_capped_by_the_reservation(new_ledger: NewLedger) -> None:
    ledger = await new_ledger()
    await ledger.add_channel(CHANNEL, STATE, contract=CONTRACT)
    small = await reserve(ledger, voucher(2_000, 1))
    assert small.amount == PLAN.worst_case == 900
    # The upstream reported more than was reserved: the voucher would cover 2,000, but this
    # request was only ever allowed to cost its reservation. The list-price cost is kept.
    settled = await ledger.settle(small, price_cost=5_000, input_tokens=100, output_tokens=2_400, status=UsageStatus.OK)
    assert (settled.cost, settled.price_cost, settled.total) == (900, 5_000, 900)
    totals = await ledger.totals()  # the books count what was not charged beyond reservations
    assert (totals.over_reservation_requests, totals.over_reservation_amount) == (1, 4_100)
    row = await ledger.fetchone("SELECT reserved, price_cost, cost FROM usage WHERE id = ?", (small.usage_id,))
    assert row == (900, 5_000, 900)
    record = await ledger.get_channel(CHANNEL)
    assert record is not None and (record.charged, record.reserved) == (900, 0)


@both_engines
@pytest.mark.rule(2)
async def test_concurrent_reservations_share_the_headroom(new_ledger: NewLedger) -> None:
    ledger = await new_ledger()
    await ledger.add_channel(CHANNEL, STATE, contract=CONTRACT)
    first = await reserve(ledger, voucher(1_000, 1))
    assert first.amount == PLAN.worst_case == 900
    # The next voucher adds 200: the headroom is 1,200 - 900 in flight = 300.
    second = await reserve(ledger, voucher(1_200, 2))
    assert second.amount <= 300 and second.output_tokens == (300 - 100) * 1000 // 2000
    record = await ledger.get_channel(CHANNEL)
    assert record is not None and record.reserved == first.amount + second.amount


async def test_migrations_run_once(tmp_path: Path) -> None:
    for _ in range(2):
        ledger = await open_ledger(tmp_path / "l.db")
        versions = await ledger.fetchall("SELECT version FROM schema_migrations")
        assert versions == [(version,) for version in range(1, len(MIGRATIONS) + 1)]
        assert await ledger.fetchone("PRAGMA journal_mode") == ("wal",)
        await ledger.close()


@both_engines
@pytest.mark.rule(5)
async def test_shutdown_mid_request_releases_the_reservation(
    provider: Provider, open_channel: ChannelFactory, upstream: Upstream
) -> None:
    consumer = await open_channel(provider)
    seen = len(upstream.stats.requests)
    call = asyncio.create_task(paid_chat(provider.client(), consumer, content='!demo {"delay": 3}'))
    await wait_for(lambda: len(upstream.stats.requests) > seen)
    await provider.server.close()  # the server stops: the in-flight handler is cancelled
    with pytest.raises(openai.APIConnectionError):
        await call
    # The app has closed its ledger: read what it left with a new one (as the next start would).
    ledger = make_ledger(provider.settings.database_path, url=provider.settings.database_url)
    await ledger.open()
    try:
        assert await ledger.fetchall("SELECT status, cost, error FROM usage") == [
            ("failed", 0, "interrupted by shutdown")
        ]
        assert await ledger.fetchall("SELECT charged, reserved FROM channels") == [(0, 0)]
    finally:
        await ledger.close()


@pytest.mark.rule(1)
async def test_a_refused_voucher_does_not_replay_its_batch(tmp_path: Path) -> None:
    """Refusals are values: a batch holding one commits in one run, without savepoints."""
    ledger = await open_ledger(tmp_path / "l.db")
    await ledger.add_channel(CHANNEL, STATE, contract=CONTRACT)
    assert ledger._writer is not None
    replays = ledger._writer.replays
    # One turn of the event loop: one batch, one transaction.
    outcomes = await asyncio.gather(
        ledger.authorize(voucher(50_000, 1), PLAN, endpoint="/chat/completions", model="demo"),
        ledger.authorize(voucher(60_000, 1), PLAN, endpoint="/chat/completions", model="demo"),  # nonce reused
        ledger.authorize(voucher(40_000, 2), PLAN, endpoint="/chat/completions", model="demo"),  # amount went down
        ledger.authorize(voucher(70_000, 3), PLAN, endpoint="/chat/completions", model="demo"),
    )
    assert [o.code if isinstance(o, Refusal) else "ok" for o in outcomes] == [
        "ok",
        "invalid_nonce",
        "invalid_amount",
        "ok",
    ]
    assert ledger._writer.replays == replays
    record = await ledger.get_channel(CHANNEL)
    assert record is not None and record.last_nonce == 3 and record.reserved == 2 * PLAN.worst_case
    await ledger.close()


@both_engines
async def test_a_ledger_refuses_another_chain_or_contract(new_ledger: NewLedger) -> None:
    ledger = await new_ledger()
    await ledger.bind(chain_id=80002, contract="0x" + "ab" * 20)
    await ledger.bind(chain_id=80002, contract="0x" + "AB" * 20)  # the same, in another case
    with pytest.raises(LedgerMismatch, match="belongs to chain 80002"):
        await ledger.bind(chain_id=137, contract="0x" + "ab" * 20)
    with pytest.raises(LedgerMismatch):
        await ledger.bind(chain_id=80002, contract="0x" + "cd" * 20)


@both_engines
async def test_a_channel_stores_each_nonce_once_by_constraint(new_ledger: NewLedger) -> None:
    """Whatever the code does, the schema refuses a second voucher with the same (channel, nonce)."""
    ledger = await new_ledger()
    await ledger.add_channel(CHANNEL, STATE, contract=CONTRACT)
    await reserve(ledger, voucher(50_000, 7))
    insert = "INSERT INTO vouchers (channel_id, amount, nonce, signature, received_at) VALUES (?, ?, ?, ?, ?)"
    with pytest.raises((sqlite3.IntegrityError, asyncpg.UniqueViolationError)):
        await ledger.execute(insert, (CHANNEL, 60_000, "7", "0x00", 0.0))
    assert await ledger.execute(insert, (CHANNEL, 60_000, "8", "0x00", 0.0)) == 1


async def two_instances(database_urls: Callable[[], Awaitable[str]]) -> tuple[PostgresLedger, PostgresLedger]:
    """Two ledgers on one PostgreSQL database, as two provider instances have (opened at once:
    the migration lock lets one migrate while the other waits), with the test's channel."""
    url = await database_urls()
    first, second = PostgresLedger(url), PostgresLedger(url)
    await asyncio.gather(first.open(), second.open())
    await first.add_channel(CHANNEL, STATE, contract=CONTRACT)
    return first, second


# Both ways PostgreSQL writes money: a read and a write conditional on the channel's version
# (tried first), and the row lock (after OPTIMISTIC_TRIES changes under it; 0: always).
WAYS = pytest.mark.parametrize("tries", [postgres_engine.OPTIMISTIC_TRIES, 0], ids=["conditional", "locked"])


@pytest.mark.rule(2)
@WAYS
async def test_two_instances_never_spend_the_same_headroom(
    database_urls: Callable[[], Awaitable[str]], tries: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL: 50 vouchers race from two instances, each covering one worst case (900) and
    no more: the first to write is accepted, and every other one then finds the headroom taken
    (or its nonce passed)."""
    monkeypatch.setattr(postgres_engine, "OPTIMISTIC_TRIES", tries)
    ledgers = await two_instances(database_urls)
    try:
        outcomes = await asyncio.gather(
            *(
                ledgers[nonce % 2].authorize(voucher(900 + nonce, nonce), PLAN, endpoint="/chat", model="demo")
                for nonce in range(1, 51)
            )
        )
        accepted = [o for o in outcomes if isinstance(o, Reservation)]
        refused = {o.code for o in outcomes if isinstance(o, Refusal)}
        assert len(accepted) == 1 and accepted[0].amount == PLAN.worst_case
        assert refused <= {"insufficient_funds", "invalid_nonce"}
        record = await ledgers[1].get_channel(CHANNEL)
        assert record is not None and record.reserved == PLAN.worst_case <= record.last_amount
        assert await ledgers[1].fetchall("SELECT COUNT(*) FROM vouchers") == [(1,)]
        assert await ledgers[1].fetchall("SELECT COUNT(DISTINCT instance) FROM usage") == [(1,)]
    finally:
        for ledger in ledgers:
            await ledger.close()


@WAYS
async def test_two_instances_accept_each_nonce_once(
    database_urls: Callable[[], Awaitable[str]], tries: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL: the same 25 vouchers, sent to both instances at once (50 authorizations), with
    room for all: each is accepted at most once, the channel ends at the highest one accepted, and
    it holds exactly the reservations that were granted."""
    monkeypatch.setattr(postgres_engine, "OPTIMISTIC_TRIES", tries)
    ledgers = await two_instances(database_urls)
    try:
        outcomes = await asyncio.gather(
            *(
                ledger.authorize(voucher(10_000 * nonce, nonce), PLAN, endpoint="/chat", model="demo")
                for nonce in range(1, 26)
                for ledger in ledgers
            )
        )
        accepted = [o for o in outcomes if isinstance(o, Reservation)]
        assert accepted and all(o.code == "invalid_nonce" for o in outcomes if isinstance(o, Refusal))
        nonces = await ledgers[0].fetchall("SELECT nonce FROM vouchers ORDER BY id")
        assert len(nonces) == len(accepted) == len(set(nonces))
        assert [int(n) for (n,) in nonces] == sorted(int(n) for (n,) in nonces)  # accepted in nonce order
        record = await ledgers[0].get_channel(CHANNEL)
        assert record is not None
        assert record.last_nonce == max(int(n) for (n,) in nonces)
        assert record.reserved == sum(o.amount for o in accepted) <= record.last_amount
        # Settled from both instances at once: each reservation ends once, the books add up.
        settled = await asyncio.gather(
            *(
                ledger.settle(o, price_cost=500, input_tokens=100, output_tokens=200, status=UsageStatus.OK)
                for o in accepted
                for ledger in ledgers
            )
        )
        assert {s.cost for s in settled} == {500}
        record = await ledgers[1].get_channel(CHANNEL)
        assert record is not None and (record.charged, record.reserved) == (500 * len(accepted), 0)
    finally:
        for ledger in ledgers:
            await ledger.close()


async def test_postgres_migrations_run_once(database_urls: Callable[[], Awaitable[str]]) -> None:
    ledgers = await two_instances(database_urls)
    for ledger in ledgers:
        await ledger.close()
    again = PostgresLedger(ledgers[0].url)
    await again.open()
    try:
        versions = await again.fetchall("SELECT version FROM schema_migrations ORDER BY version")
        assert versions == [(version,) for version in range(1, len(PG_MIGRATIONS) + 1)]
    finally:
        await again.close()


async def test_a_write_between_the_read_and_the_conditional_write_is_never_overwritten(
    database_urls: Callable[[], Awaitable[str]],
) -> None:
    """PostgreSQL: authorize and settle write in one statement that applies only at the channel
    version they read. At a stale version nothing is written (the caller reads again); and if a
    usage row ever left `reserved` without its channel's version moving, the settle statement
    undoes itself whole rather than charge the channel for a row it cannot end."""
    first, second = await two_instances(database_urls)
    try:
        reservation = await reserve(first, voucher(2_000, 1))
        (version,) = (await first.fetchall("SELECT version FROM channels"))[0]
        args = (CHANNEL, 4_000, "2", 900, version - 1, "0x" + "ab" * 65, 1.0, "/chat", "demo", 100, None, "x")
        assert await first.pool.fetchval(postgres_engine._AUTHORIZE_UNLESS_CHANGED, *args) is None
        settle_args = [reservation.usage_id, CHANNEL, 500, reservation.amount, version - 1, "ok", 1, 1, None, 500]
        settle_args += [None, 1.0]
        assert await first.pool.fetchval(postgres_engine._SETTLE_UNLESS_CHANGED, *settle_args) == 0
        unchanged = [(1, "1", 0, reservation.amount, version)]
        assert (
            await first.fetchall(
                """SELECT COUNT(*), MAX(v.nonce), MAX(c.charged), MAX(c.reserved), MAX(c.version)
                   FROM channels c JOIN vouchers v USING (channel_id)"""
            )
            == unchanged
        )

        # The row ended behind the version's back (no write of ours does that): it fails whole.
        await first.execute("UPDATE usage SET status = 'abandoned' WHERE id = ?", (reservation.usage_id,))
        settle_args[4] = version
        with pytest.raises(asyncpg.DivisionByZeroError):
            await first.pool.fetchval(postgres_engine._SETTLE_UNLESS_CHANGED, *settle_args)
        after = await first.fetchall("SELECT charged, reserved, version FROM channels")
        assert after == [(0, reservation.amount, version)]

        # Through the ledger, a stale read is read again: both instances settle one reservation each.
        await first.execute("UPDATE usage SET status = 'reserved' WHERE id = ?", (reservation.usage_id,))
        other = await reserve(second, voucher(4_000, 2))
        settled = await asyncio.gather(
            first.settle(reservation, price_cost=300, input_tokens=1, output_tokens=1, status=UsageStatus.OK),
            second.settle(other, price_cost=200, input_tokens=1, output_tokens=1, status=UsageStatus.OK),
        )
        assert [s.cost for s in settled] == [300, 200]
        assert await second.fetchall("SELECT charged, reserved FROM channels") == [(500, 0)]
    finally:
        await first.close()
        await second.close()
