"""The instances sharing a PostgreSQL ledger: who is alive, what the dead leave reserved, and
which one claims.

Every instance has a row in `instances` and beats its `heartbeat_at`; all times are the
database's clock (`clock_timestamp()`), so that the hosts' clocks do not matter. An instance
silent for longer than INSTANCE_TIMEOUT is declared dead by whichever instance looks first; the
reservations of dead, stopped or unknown instances are released in the same transaction.
Exactly once: a row is released only while it is still `reserved` (PostgreSQL re-checks that
under the row's lock), and its channel gives back exactly what the row held; a later settle of
it by its (zombie) instance finds it no longer reserved and changes nothing.

Locks are taken in the order the money transactions take them (the channel rows, in
channel_id order, before any usage row), so a release never deadlocks with them.

The claimer is whichever instance holds the session advisory lock LEADER_LOCK, on a connection
of its own: PostgreSQL frees it when that connection ends (a crash, a network cut), and another
instance takes it at its next try.
"""

from __future__ import annotations

import abc
import asyncio
import logging

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from ..states import UsageStatus
from .base import ENGINE_ERRORS, Ledger

log = logging.getLogger(__name__)

# The database's clock, in unix seconds.
NOW = "extract(epoch from clock_timestamp())::double precision"
# How long a leader's connection may take to answer `SELECT 1` before it is taken for dead.
LEADER_CHECK_TIMEOUT = 2.0

# The reservations nobody alive holds: their instance is dead, stopped, or not registered.
_ORPHANED = """u.status = $1 AND NOT EXISTS (
    SELECT 1 FROM instances i WHERE i.instance_id = u.instance AND i.dead_at IS NULL AND i.stopped_at IS NULL)"""


class PostgresInstances(Ledger):
    """The instance and leadership methods of PostgresLedger (which provides `pool`, `url`,
    `instance_id`, the `_leader` connection and `finish_writes`)."""

    url: str
    _leader: asyncpg.Connection | None

    @property
    @abc.abstractmethod
    def pool(self) -> asyncpg.Pool: ...

    @abc.abstractmethod
    async def finish_writes(self) -> None: ...

    async def start_instance(self) -> int:
        """Register this instance, and release the reservations of instances known to be gone
        (dead, stopped, or never registered). Those of instances that are merely silent wait for
        `reap_dead_instances` (the server's first beat, at once), which knows INSTANCE_TIMEOUT."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                f"INSERT INTO instances (instance_id, started_at, heartbeat_at) VALUES ($1, {NOW}, {NOW})",
                self.instance_id,
            )
            released = await _release_orphans(conn)
        log.info("instance_started instance=%s released=%d", self.instance_id, released)
        return released

    async def heartbeat(self) -> bool:
        status = await self.pool.execute(
            f"UPDATE instances SET heartbeat_at = {NOW} WHERE instance_id = $1 AND dead_at IS NULL",
            self.instance_id,
        )
        return status != "UPDATE 0"

    async def reap_dead_instances(self, older_than: float) -> int:
        """One transaction: the instances silent for `older_than` seconds (not this one) are
        marked dead, and every orphaned reservation is released. Two instances reaping at once
        skip each other's picks (SKIP LOCKED) and never release a row twice."""
        async with self.pool.acquire() as conn, conn.transaction():
            dead = await conn.fetch(
                f"""UPDATE instances SET dead_at = {NOW} WHERE instance_id IN (
                        SELECT instance_id FROM instances
                        WHERE dead_at IS NULL AND stopped_at IS NULL AND instance_id != $1
                          AND heartbeat_at < {NOW} - $2
                        FOR UPDATE SKIP LOCKED)
                    RETURNING instance_id""",
                self.instance_id,
                older_than,
            )
            released = await _release_orphans(conn)
            for row in dead:
                count = await conn.fetchval("SELECT released FROM instances WHERE instance_id = $1", row[0])
                log.warning("instance_dead instance=%s released=%d", row[0], count)
        return released

    async def stop_instance(self) -> None:
        """A clean stop (after the requests in flight have finished): what this instance still
        holds is released, and the others no longer wait for its heartbeat. The money writes
        still under way finish first: a request cut off by the stop releases its own reservation,
        with its reason, rather than find it released as abandoned."""
        await self.finish_writes()
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                f"UPDATE instances SET stopped_at = {NOW} WHERE instance_id = $1 AND stopped_at IS NULL",
                self.instance_id,
            )
            released = await _release_orphans(conn)
        log.info("instance_stopped instance=%s released=%d", self.instance_id, released)

    # --- leadership ---------------------------------------------------------------------------

    async def try_lead(self) -> bool:
        async with self._lead_lock:
            if self._leader is not None:
                try:
                    await asyncio.wait_for(self._leader.fetchval("SELECT 1"), LEADER_CHECK_TIMEOUT)
                    return True
                except Exception as exc:  # (whatever it is, the session cannot be trusted)
                    # The session is gone, and the lock with it: another instance may lead now.
                    self._leader.terminate()
                    self._leader = None
                    log.warning("leadership_lost instance=%s error=%s", self.instance_id, type(exc).__name__)
                    return False
            conn = await asyncpg.connect(self.url)
            try:
                leading = bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", _lock_key()))
            except BaseException:
                conn.terminate()
                raise
            if not leading:
                await conn.close()
                return False
            self._leader = conn
            log.info("leadership_taken instance=%s", self.instance_id)
            return True

    async def resign(self) -> None:
        async with self._lead_lock:
            if self._leader is None:
                return
            conn, self._leader = self._leader, None
            try:
                await asyncio.wait_for(conn.execute("SELECT pg_advisory_unlock($1)", _lock_key()), LEADER_CHECK_TIMEOUT)
                await asyncio.wait_for(conn.close(), LEADER_CHECK_TIMEOUT)
            except ENGINE_ERRORS:
                conn.terminate()  # the lock goes with the session
            log.info("leadership_resigned instance=%s", self.instance_id)

    @property
    def _lead_lock(self) -> asyncio.Lock:
        """One election at a time in this process (the claimer's loop, an admin claim)."""
        lock: asyncio.Lock | None = self.__dict__.get("_lead_lock_")
        if lock is None:
            lock = self.__dict__["_lead_lock_"] = asyncio.Lock()
        return lock


def _lock_key() -> int:
    from .postgres import LEADER_LOCK  # (postgres.py imports this module)

    return LEADER_LOCK


async def _release_orphans(conn: PoolConnectionProxy[asyncpg.Record]) -> int:
    """Release the reservations nobody alive holds, inside the caller's transaction: their channel
    rows are locked first, in channel_id order (as the money transactions lock them), then each
    row still `reserved` is abandoned and its channel gives back what it held. A row that became
    orphaned in another channel meanwhile waits for the next call."""
    channels = [
        row[0]
        for row in await conn.fetch(
            f"SELECT DISTINCT u.channel_id FROM usage u WHERE {_ORPHANED} ORDER BY u.channel_id",
            UsageStatus.RESERVED.value,
        )
    ]
    if not channels:
        return 0
    await conn.execute(
        "SELECT 1 FROM channels WHERE channel_id = ANY($1::text[]) ORDER BY channel_id FOR UPDATE", channels
    )
    released = await conn.fetch(
        f"""UPDATE usage u SET status = $2, finished_at = {NOW}
            WHERE {_ORPHANED} AND u.channel_id = ANY($3::text[])
            RETURNING u.channel_id, u.reserved, u.instance""",
        UsageStatus.RESERVED.value,
        UsageStatus.ABANDONED.value,
        channels,
    )
    per_channel: dict[str, int] = {}
    per_instance: dict[str, int] = {}
    for channel_id, reserved, instance in released:
        per_channel[channel_id] = per_channel.get(channel_id, 0) + reserved
        if instance is not None:
            per_instance[instance] = per_instance.get(instance, 0) + 1
    await conn.executemany(
        "UPDATE channels SET reserved = reserved - $2, version = version + 1 WHERE channel_id = $1",
        sorted(per_channel.items()),
    )
    await conn.executemany(
        "UPDATE instances SET released = released + $2 WHERE instance_id = $1", sorted(per_instance.items())
    )
    return len(released)
