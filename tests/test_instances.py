"""Several provider instances on one PostgreSQL ledger: each beats a heartbeat; the reservations of
an instance found dead are released once, by whichever instance looks first, and never those of
a live one; an instance declared dead registers again; one instance claims at a time, and another
takes over when it goes. On SQLite (one process) a start releases everything and it always leads."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import aiohttp
import pytest
from helpers import ChannelFactory, Provider, ProviderFactory, paid_chat

from drain_provider.chain import ChainClient
from drain_provider.claimer import NotLeader
from drain_provider.devtools.devchain import DevChain
from drain_provider.instances import beat, keep_alive
from drain_provider.ledger import Ledger, PostgresLedger, Reservation, SQLiteLedger
from drain_provider.ledger.postgres import LEADER_LOCK
from drain_provider.states import UsageStatus

Ledgers = Callable[[], Awaitable[PostgresLedger]]
TOKEN = "admin-0123456789abcdef-secret"
TIMEOUT = 30.0


@pytest.fixture
async def ledgers(database_urls: Callable[[], Awaitable[str]]) -> AsyncIterator[Ledgers]:
    """Opens instances of one PostgreSQL ledger, each started (registered) like a server's."""
    url = await database_urls()
    opened: list[PostgresLedger] = []

    async def open_() -> PostgresLedger:
        ledger = PostgresLedger(url, pool_size=3)
        await ledger.open()
        opened.append(ledger)
        await ledger.start_instance()
        return ledger

    yield open_
    for ledger in opened:
        await ledger.close()


async def add_channel(ledger: Ledger, channel_id: str) -> int:
    """A channel with one voucher (raw SQL, both engines); the voucher's id."""
    await ledger.execute(
        """INSERT INTO channels (channel_id, consumer, provider, deposit, claimed, expiry, synced_at, created_at)
           VALUES (?, '0xc', '0xp', 1000000, 0, 9999999999, 0, 0)""",
        (channel_id,),
    )
    await ledger.execute(
        "INSERT INTO vouchers (channel_id, amount, nonce, signature, received_at) VALUES (?, 500000, '1', '0x', 0)",
        (channel_id,),
    )
    row = await ledger.fetchone("SELECT id FROM vouchers WHERE channel_id = ?", (channel_id,))
    assert row is not None
    return int(row[0])


async def reserve(ledger: Ledger, channel_id: str, voucher_id: int, amount: int) -> int:
    """A reservation held by `ledger`'s instance, as authorize leaves it; the usage row's id."""
    await ledger.execute(
        """INSERT INTO usage (channel_id, voucher_id, endpoint, model, status, reserved, input_tokens, started_at,
                              instance)
           VALUES (?, ?, 'chat', 'm', 'reserved', ?, 1, 0, ?)""",
        (channel_id, voucher_id, amount, ledger.instance_id),
    )
    await ledger.execute("UPDATE channels SET reserved = reserved + ? WHERE channel_id = ?", (amount, channel_id))
    row = await ledger.fetchone("SELECT MAX(id) FROM usage")
    assert row is not None
    return int(row[0])


async def reserved(ledger: Ledger, channel_id: str) -> int:
    row = await ledger.fetchone("SELECT reserved FROM channels WHERE channel_id = ?", (channel_id,))
    assert row is not None
    return int(row[0])


async def statuses(ledger: Ledger) -> dict[int, str]:
    return dict(await ledger.fetchall("SELECT id, status FROM usage"))


async def make_stale(ledger: Ledger, instance_id: str, seconds: float = 1000) -> None:
    await ledger.execute(
        "UPDATE instances SET heartbeat_at = heartbeat_at - ? WHERE instance_id = ?", (seconds, instance_id)
    )


# --- reaping ------------------------------------------------------------------------------------


async def test_a_dead_instance_is_released_exactly_once_and_a_live_one_never(
    ledgers: Ledgers, caplog: pytest.LogCaptureFixture
) -> None:
    dead, live, other = await ledgers(), await ledgers(), await ledgers()
    one, two = await add_channel(live, "0x01"), await add_channel(live, "0x02")
    gone = [await reserve(dead, "0x01", one, 100), await reserve(dead, "0x01", one, 50)]
    gone.append(await reserve(dead, "0x02", two, 30))
    kept = await reserve(live, "0x01", one, 7)
    await make_stale(dead, dead.instance_id)
    await make_stale(live, live.instance_id, TIMEOUT / 2)  # late, but within the timeout

    # Two instances look at once: the rows are released once between them.
    caplog.set_level(logging.WARNING, "drain_provider.ledger.pg_instances")
    counts = await asyncio.gather(live.reap_dead_instances(TIMEOUT), other.reap_dead_instances(TIMEOUT))

    assert sorted(counts) == [0, 3]
    assert await reserved(live, "0x01") == 7 and await reserved(live, "0x02") == 0
    rows = await statuses(live)
    assert [rows[i] for i in gone] == ["abandoned"] * 3 and rows[kept] == "reserved"
    found = await live.fetchone(
        "SELECT dead_at IS NOT NULL, released FROM instances WHERE instance_id = ?", (dead.instance_id,)
    )
    assert found == (True, 3)
    assert f"instance_dead instance={dead.instance_id} released=3" in caplog.text
    # Nothing more to release, whoever looks again; the dead instance learns it at its next beat.
    assert await live.reap_dead_instances(TIMEOUT) == await other.reap_dead_instances(TIMEOUT) == 0
    assert await reserved(live, "0x01") == 7
    assert not await dead.heartbeat()
    assert await live.heartbeat() and await other.heartbeat()


async def test_a_zombie_settle_after_its_release_changes_nothing(ledgers: Ledgers) -> None:
    zombie, reaper = await ledgers(), await ledgers()
    voucher_id = await add_channel(reaper, "0x03")
    usage_id = await reserve(zombie, "0x03", voucher_id, 100)
    await make_stale(reaper, zombie.instance_id)
    assert await reaper.reap_dead_instances(TIMEOUT) == 1

    settled = await zombie.settle(
        Reservation(usage_id, "0x03", 100, 10),
        price_cost=60,
        input_tokens=5,
        output_tokens=5,
        status=UsageStatus.OK,
    )

    assert settled.cost == 0
    row = await reaper.fetchone("SELECT charged, reserved FROM channels WHERE channel_id = '0x03'")
    assert row == (0, 0)
    assert (await statuses(reaper))[usage_id] == "abandoned"


async def test_start_and_stop_release_only_what_nobody_alive_holds(ledgers: Ledgers) -> None:
    first, second = await ledgers(), await ledgers()
    voucher_id = await add_channel(first, "0x04")
    stopped = await reserve(first, "0x04", voucher_id, 40)
    held = await reserve(second, "0x04", voucher_id, 2)
    unknown = await reserve(second, "0x04", voucher_id, 5)
    await second.execute("UPDATE usage SET instance = 'gone-1' WHERE id = ?", (unknown,))  # (a row no one owns)

    await first.stop_instance()  # a clean stop: its own, and what no registered instance holds

    assert await reserved(second, "0x04") == 2
    rows = await statuses(second)
    assert rows[stopped] == rows[unknown] == "abandoned" and rows[held] == "reserved"
    row = await second.fetchone(
        "SELECT stopped_at IS NOT NULL FROM instances WHERE instance_id = ?", (first.instance_id,)
    )
    assert row == (True,)
    # A stopped instance is not declared dead later; a new one starting releases nothing live.
    await make_stale(second, first.instance_id)
    assert await second.reap_dead_instances(TIMEOUT) == 0
    third = await ledgers()  # (started)
    assert (await statuses(third))[held] == "reserved" and await reserved(third, "0x04") == 2


async def test_a_stop_lets_the_releases_under_way_finish_first(ledgers: Ledgers) -> None:
    """A request cut off by the stop releases its own reservation, with its reason: the stop
    waits for that write before it releases what is left as abandoned (found in CI: the two
    raced, and the row ended `abandoned` without its reason)."""
    ledger = await ledgers()
    voucher_id = await add_channel(ledger, "0x06")
    rows = [await reserve(ledger, "0x06", voucher_id, 10) for _ in range(8)]
    for usage_id in rows:  # fired, not awaited, as a cancelled handler's release is
        ledger.release(Reservation(usage_id, "0x06", 10, 1), error="interrupted by shutdown")
    await ledger.stop_instance()
    assert set((await statuses(ledger)).values()) == {"failed"}
    assert await reserved(ledger, "0x06") == 0


async def test_an_instance_declared_dead_registers_again(ledgers: Ledgers, caplog: pytest.LogCaptureFixture) -> None:
    ledger, other = await ledgers(), await ledgers()
    voucher_id = await add_channel(ledger, "0x05")
    await reserve(ledger, "0x05", voucher_id, 100)
    old = ledger.instance_id
    await make_stale(other, old)
    assert await other.reap_dead_instances(TIMEOUT) == 1

    with caplog.at_level(logging.ERROR, "drain_provider.instances"):
        await beat(ledger, TIMEOUT)

    assert ledger.instance_id != old
    assert f"instance_declared_dead instance={old} new_instance={ledger.instance_id}" in caplog.text
    rows = await other.fetchall(
        "SELECT instance_id, dead_at IS NULL FROM instances WHERE instance_id IN (?, ?)", (old, ledger.instance_id)
    )
    assert sorted(rows) == sorted([(old, False), (ledger.instance_id, True)])
    assert await ledger.heartbeat()
    # Its new reservations are its own again: a reaping by the others leaves them.
    kept = await reserve(ledger, "0x05", voucher_id, 9)
    assert await other.reap_dead_instances(TIMEOUT) == 0
    assert (await statuses(other))[kept] == "reserved"


async def test_the_heartbeat_task_keeps_an_instance_alive(ledgers: Ledgers) -> None:
    ledger, other = await ledgers(), await ledgers()
    voucher_id = await add_channel(ledger, "0x06")
    kept = await reserve(ledger, "0x06", voucher_id, 100)
    await make_stale(ledger, ledger.instance_id, 0.4)
    task = asyncio.create_task(keep_alive(ledger, 0.3))  # beats at once, then every 0.1 s
    try:
        await asyncio.sleep(0.25)
        assert await other.reap_dead_instances(0.3) == 0
    finally:
        task.cancel()
    assert (await statuses(other))[kept] == "reserved"
    await asyncio.sleep(0.35)  # silent now: found dead
    assert await other.reap_dead_instances(0.3) == 1


# --- leadership ---------------------------------------------------------------------------------


async def test_one_instance_leads_until_it_resigns_closes_or_loses_its_connection(ledgers: Ledgers) -> None:
    first, second, third = await ledgers(), await ledgers(), await ledgers()
    assert await first.try_lead()
    assert not await second.try_lead() and not await third.try_lead()
    assert await first.try_lead()  # kept
    await first.resign()
    assert await second.try_lead() and not await first.try_lead()
    await second.close()  # its process ending alike: PostgreSQL frees the lock with the session
    assert await third.try_lead()
    # A leader whose connection died learns it at its next try (another may lead by then).
    await first.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted AND objid = ?",
        (LEADER_LOCK & 0xFFFFFFFF,),  # (a bigint key's low 32 bits)
    )
    assert not await third.try_lead()
    assert await first.try_lead()


# --- the provider app -----------------------------------------------------------------------------


async def admin_claim(provider: Provider) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{provider.url}/admin/claim?force=1", headers={"Authorization": f"Bearer {TOKEN}"}) as resp,
    ):
        return resp.status, await resp.json()


async def health(provider: Provider) -> Any:
    async with aiohttp.ClientSession() as session, session.get(str(provider.server.make_url("/health"))) as resp:
        return await resp.json()


async def test_one_instance_claims_and_another_takes_over_when_it_goes(
    provider_factory: ProviderFactory, open_channel: ChannelFactory, database_urls: Callable[[], Awaitable[str]]
) -> None:
    url = await database_urls()
    first = await provider_factory(database_url=url, admin_token=TOKEN)
    second = await provider_factory(
        database_url=url, admin_token=TOKEN, provider_private_key=first.settings.provider_private_key
    )
    assert first.ledger.instance_id != second.ledger.instance_id
    leader, follower = (first, second) if await first.claimer.lead() else (second, first)
    assert await leader.claimer.lead() and not await follower.claimer.lead()
    assert (await health(leader))["leader"] and not (await health(follower))["leader"]
    assert (await health(follower))["instance"] == follower.ledger.instance_id

    early, late = await open_channel(leader), await open_channel(leader)
    await paid_chat(follower.client(), early)  # either instance serves any channel
    status, body = await admin_claim(follower)
    assert status == 409 and body["error"]["code"] == "not_claimer"
    with pytest.raises(NotLeader):
        await follower.claimer.cycle(force=True)
    outcomes = await leader.claimer.cycle()  # (below the threshold: nothing)
    assert outcomes == []
    leader.claimer.settings = replace(leader.claimer.settings, claim_threshold=1)
    outcomes = await leader.claimer.cycle()
    assert [(o.channel_id, o.status) for o in outcomes] == [(early.channel_id, "confirmed")]
    await paid_chat(leader.client(), late)

    await leader.server.close()  # the claimer goes, and its leadership with it

    follower.claimer.settings = replace(follower.claimer.settings, claim_threshold=1)
    outcomes = await follower.claimer.cycle(force=True)
    assert [(o.channel_id, o.status) for o in outcomes] == [(late.channel_id, "confirmed")]
    assert (await health(follower))["leader"]
    claims = await follower.ledger.fetchall("SELECT channel_id, amount FROM claims WHERE status = 'confirmed'")
    assert sorted(claims) == sorted(set(claims)) and len(claims) == 2  # each claimed once
    for consumer in (early, late):
        record = await follower.ledger.get_channel(consumer.channel_id)
        assert record is not None and (consumer.channel_id, record.claimed) in claims
    await follower.server.close()


async def test_the_claim_command_refuses_while_another_instance_claims(
    anvil_chain: DevChain, provider_factory: ProviderFactory, database_urls: Callable[[], Awaitable[str]]
) -> None:
    url = await database_urls()
    provider = await provider_factory(
        chain_client=ChainClient.over_http(anvil_chain.rpc_url or "", anvil_chain.contract),
        on=anvil_chain,
        database_url=url,
    )
    assert await provider.claimer.lead()
    env = {
        **os.environ,
        "PROVIDER_PRIVATE_KEY": "0x" + provider.settings.provider_private_key.hex(),
        "CHAIN_ID": str(anvil_chain.chain_id),
        "RPC_URL": anvil_chain.rpc_url or "",
        "DRAIN_CONTRACT": anvil_chain.contract,
        "UPSTREAM_BASE_URL": "http://127.0.0.1:9/v1",
        "DATABASE_URL": url,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "drain_provider", "claim", "--force", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 2 and out == b""
    assert "drain-provider: another instance is the claimer\n" in err.decode()
    await provider.server.close()


async def test_an_app_beats_and_stops_cleanly(
    provider_factory: ProviderFactory, open_channel: ChannelFactory, database_urls: Callable[[], Awaitable[str]]
) -> None:
    url = await database_urls()
    provider = await provider_factory(database_url=url, instance_timeout=0.3)
    instance = provider.ledger.instance_id
    await provider.ledger.execute("UPDATE instances SET dead_at = 1 WHERE instance_id = ?", (instance,))
    for _ in range(50):  # the next beat (every 0.1 s) finds it declared dead
        if provider.ledger.instance_id != instance:
            break
        await asyncio.sleep(0.05)
    assert provider.ledger.instance_id != instance
    await paid_chat(provider.client(), await open_channel(provider))
    new = provider.ledger.instance_id
    rows = await provider.ledger.fetchall("SELECT instance FROM usage")
    assert rows == [(new,)]
    await provider.server.close()
    check = PostgresLedger(url)
    await check.open()
    try:
        row = await check.fetchone("SELECT stopped_at IS NOT NULL FROM instances WHERE instance_id = ?", (new,))
        assert row == (True,)
    finally:
        await check.close()


# --- SQLite: one process --------------------------------------------------------------------------


async def test_on_sqlite_a_start_releases_everything_and_the_process_leads(
    provider: Provider, new_ledger: Callable[[], Awaitable[Ledger]]
) -> None:
    assert (await health(provider))["leader"] is True
    assert await provider.claimer.lead()
    ledger = await new_ledger()
    assert isinstance(ledger, SQLiteLedger)
    voucher_id = await add_channel(ledger, "0x07")
    await reserve(ledger, "0x07", voucher_id, 10)
    await ledger.execute("UPDATE usage SET instance = 'another-1'")  # whoever held it: one process per file
    assert await ledger.start_instance() == 1
    assert await reserved(ledger, "0x07") == 0
    assert await ledger.heartbeat() and await ledger.try_lead()
    assert await ledger.reap_dead_instances(0) == 0
