"""The ledger's guarantees: vouchers are durable before the client gets a byte, every
reservation ends in exactly one settle or release, and a restart releases what a crash left."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path

import openai
import pytest
from helpers import ChannelFactory, Provider, ProviderFactory, Upstream, paid_chat, wait_for

from drain_provider.devtools.devchain import DevChain
from drain_provider.ledger import MIGRATIONS, Ledger, Refusal, Reservation, SQLiteLedger
from drain_provider.pricing import ModelPrice, ReservationPlan
from drain_provider.protocol import ChannelState, Voucher
from drain_provider.states import UsageStatus

CHANNEL = "0x" + "cd" * 32
STATE = ChannelState(consumer="0x" + "11" * 20, provider="0x" + "22" * 20, deposit=1_000_000, claimed=0, expiry=2**40)
CONTRACT = "0x" + "33" * 20
PLAN = ReservationPlan(ModelPrice(1000, 2000), input_tokens=100, wanted_output_tokens=400, min_output_tokens=16)


def voucher(amount: int, nonce: int) -> Voucher:
    return Voucher(CHANNEL, amount, nonce, bytes(65))


async def reserve(ledger: Ledger, voucher: Voucher, plan: ReservationPlan = PLAN) -> Reservation:
    outcome = await ledger.authorize(voucher, plan, endpoint="/chat/completions", model="demo")
    assert isinstance(outcome, Reservation), outcome
    return outcome


async def open_ledger(path: Path) -> Ledger:
    ledger = SQLiteLedger(path)
    await ledger.open()
    return ledger


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
    # The stream is still running; another connection (another process, after a crash) already
    # sees the voucher and the reservation.
    with sqlite3.connect(provider.settings.database_path) as conn:
        stored = conn.execute("SELECT amount, nonce FROM vouchers WHERE channel_id = ?", (consumer.channel_id,))
        assert stored.fetchall() == [(consumer.amount, str(consumer.nonce))]
        reserved = conn.execute("SELECT reserved FROM channels WHERE channel_id = ?", (consumer.channel_id,))
        assert reserved.fetchone()[0] > 0
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


async def test_settle_happens_once(tmp_path: Path) -> None:
    ledger = await open_ledger(tmp_path / "l.db")
    await ledger.add_channel(CHANNEL, STATE, contract=CONTRACT)
    reservation = await reserve(ledger, voucher(50_000, 1))
    first = await ledger.settle(reservation, price_cost=700, input_tokens=100, output_tokens=300, status=UsageStatus.OK)
    again = await ledger.settle(reservation, price_cost=5000, input_tokens=1, output_tokens=1, status=UsageStatus.OK)
    await ledger.release(reservation, error="late")
    assert again.cost == first.cost == 700
    record = await ledger.get_channel(CHANNEL)
    assert record is not None and (record.charged, record.reserved) == (700, 0)
    await ledger.close()


@pytest.mark.rule(3)
async def test_charge_is_capped_by_the_reservation(tmp_path: Path) -> None:
    ledger = await open_ledger(tmp_path / "l.db")
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
    await ledger.close()


@pytest.mark.rule(2)
async def test_concurrent_reservations_share_the_headroom(tmp_path: Path) -> None:
    ledger = await open_ledger(tmp_path / "l.db")
    await ledger.add_channel(CHANNEL, STATE, contract=CONTRACT)
    first = await reserve(ledger, voucher(1_000, 1))
    assert first.amount == PLAN.worst_case == 900
    # The next voucher adds 200: the headroom is 1,200 - 900 in flight = 300.
    second = await reserve(ledger, voucher(1_200, 2))
    assert second.amount <= 300 and second.output_tokens == (300 - 100) * 1000 // 2000
    record = await ledger.get_channel(CHANNEL)
    assert record is not None and record.reserved == first.amount + second.amount
    await ledger.close()


async def test_migrations_run_once(tmp_path: Path) -> None:
    for _ in range(2):
        ledger = await open_ledger(tmp_path / "l.db")
        versions = await ledger.fetchall("SELECT version FROM schema_migrations")
        assert versions == [(version,) for version in range(1, len(MIGRATIONS) + 1)]
        assert await ledger.fetchone("PRAGMA journal_mode") == ("wal",)
        await ledger.close()


@pytest.mark.rule(5)
async def test_shutdown_mid_request_releases_the_reservation(
    provider: Provider, open_channel: ChannelFactory, upstream: Upstream
) -> None:
    consumer = await open_channel(provider)
    seen = len(upstream.stats.requests)
    call = asyncio.create_task(paid_chat(provider.client(), consumer, content='!demo {"delay": 3}'))
    await wait_for(lambda: len(upstream.stats.requests) > seen)
    path = provider.settings.database_path
    await provider.server.close()  # the server stops: the in-flight handler is cancelled
    with pytest.raises(openai.APIConnectionError):
        await call
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT status, cost, error FROM usage").fetchall() == [
            ("failed", 0, "interrupted by shutdown")
        ]
        assert conn.execute("SELECT charged, reserved FROM channels").fetchall() == [(0, 0)]


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


async def test_a_ledger_refuses_another_chain_or_contract(tmp_path: Path) -> None:
    from drain_provider.ledger import LedgerMismatch

    ledger = await open_ledger(tmp_path / "l.db")
    await ledger.bind(chain_id=80002, contract="0x" + "ab" * 20)
    await ledger.bind(chain_id=80002, contract="0x" + "AB" * 20)  # the same, in another case
    with pytest.raises(LedgerMismatch, match="belongs to chain 80002"):
        await ledger.bind(chain_id=137, contract="0x" + "ab" * 20)
    with pytest.raises(LedgerMismatch):
        await ledger.bind(chain_id=80002, contract="0x" + "cd" * 20)
    await ledger.close()
