"""The ledger's one interface. Two engines implement it: SQLite (sqlite.py, the embedded default,
one process) and PostgreSQL (postgres.py, several provider instances on one database).

What every engine must keep true, whatever runs at the same time (docs/DESIGN.md, rules of
money): `authorize` decides a voucher and its reservation against the channel's row as it is
at that moment, all or nothing, and two vouchers of one channel never both pass on the same
headroom; a (channel, nonce) is stored at most once; a reservation ends exactly once (`settle`,
`release`, or reclaimed from a dead instance); a channel has at most one claim in flight.

Four writes return futures rather than coroutines (`authorize`, `settle`, `release`,
`sign_close`): the write happens even if nobody awaits it any more (a client that leaves does
not undo its own charge).
"""

from __future__ import annotations

import abc
import asyncio
import os
import secrets
import socket
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg

from ..pricing import ReservationPlan
from ..protocol import ChannelClose, ChannelState, ClaimPaid, Voucher
from ..states import ClaimStatus, UsageSource, UsageStatus
from .reads import SharedReads
from .records import (
    ChannelRecord,
    ClaimTarget,
    CloseAuthorization,
    CloseFigures,
    Refusal,
    Reservation,
    Settlement,
)

# What a ledger that cannot be used raises: a file, a server, a connection gone (OSError holds
# TimeoutError: a server that does not answer in time), and asyncpg's protocol errors (a server
# that is not PostgreSQL at all, a session killed in the middle of a query).
ENGINE_ERRORS = (
    sqlite3.Error,
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)


def new_instance_id() -> str:
    """A name for this process among the instances sharing a ledger: readable in the usage rows
    and logs (host and pid), and never reused (a restart with the same pid is another instance)."""
    return f"{socket.gethostname()[:40]}-{os.getpid()}-{secrets.token_hex(3)}"


class Ledger(SharedReads):
    """Channels, vouchers, usage and claims, with the two money transactions. The reads are
    written once for both engines (reads.py); the writes are each engine's."""

    #: Which engine (`sqlite`, `postgresql`): shown in logs, /health and the metrics.
    engine: str
    #: Where it is, as it may be shown (a path, or a URL without its password).
    where: str
    #: This process among the instances sharing the ledger (usage rows carry it).
    instance_id: str

    # --- lifecycle ----------------------------------------------------------------------------

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect, and bring the schema to the newest migration."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close every connection (a held leadership is given up with them). Safe to call twice,
        and after a failed `open`."""

    @abc.abstractmethod
    async def bind(self, *, chain_id: int, contract: str, served: Sequence[str] = ()) -> None:
        """Tie the ledger to one chain and contract at its first start, and refuse another later
        (LedgerMismatch). See SQLiteLedger.bind for the whole rule."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise if the ledger cannot write now (health checks)."""

    @abc.abstractmethod
    async def set_watched_block(self, block: int) -> None: ...

    # --- any SQL (reports, tests, upkeep); the reads are in reads.py ----------------------------

    @abc.abstractmethod
    async def execute(self, sql: str, params: tuple[Any, ...] = ()) -> int:
        """One writing statement, in its own transaction; the number of rows it changed."""

    # --- instances (several processes on one ledger) --------------------------------------------

    @abc.abstractmethod
    async def start_instance(self) -> int:
        """Register this process as a live instance, and release what is known to be abandoned:
        on SQLite (one process per file) every reservation left by a previous run; on PostgreSQL
        those of instances that are dead (`reap_dead_instances`). The count released."""

    @abc.abstractmethod
    async def heartbeat(self) -> bool:
        """Tell the others this instance is alive. False if it was already declared dead (its
        reservations were released): it must stop serving paid requests."""

    @abc.abstractmethod
    async def reap_dead_instances(self, older_than: float) -> int:
        """Declare dead the instances whose heartbeat is older than `older_than` seconds, and release
        their reservations, each exactly once; the count released."""

    @abc.abstractmethod
    async def stop_instance(self) -> None:
        """A clean stop: this instance is gone, and what it still holds is released."""

    @abc.abstractmethod
    async def try_lead(self) -> bool:
        """Become (or stay) the one instance that claims: True while this instance holds the
        leadership. Kept until `resign`, `close`, or the death of the process."""

    @abc.abstractmethod
    async def resign(self) -> None:
        """Give up the leadership if held."""

    # --- channels -----------------------------------------------------------------------------

    @abc.abstractmethod
    async def add_channel(
        self, channel_id: str, state: ChannelState, *, contract: str, block: int | None = None
    ) -> ChannelRecord: ...

    @abc.abstractmethod
    async def record_open(self, channel_id: str, state: ChannelState, *, block: int | None = None) -> ChannelRecord: ...

    @abc.abstractmethod
    async def book_close(self, channel_id: str, close: ChannelClose | None) -> ChannelRecord | None: ...

    # --- cooperative close --------------------------------------------------------------------

    @abc.abstractmethod
    async def begin_close(self, channel_id: str) -> ChannelRecord | None: ...

    @abc.abstractmethod
    def sign_close(
        self, channel_id: str, sign: Callable[[CloseFigures], CloseAuthorization]
    ) -> asyncio.Future[CloseAuthorization | None]: ...

    # --- the two money transactions -----------------------------------------------------------

    @abc.abstractmethod
    def authorize(
        self,
        voucher: Voucher,
        plan: ReservationPlan,
        *,
        endpoint: str,
        model: str,
        request_id: str | None = None,
        before_commit: asyncio.Future[Reservation | Refusal] | None = None,
    ) -> asyncio.Future[Reservation | Refusal]: ...

    @abc.abstractmethod
    def settle(
        self,
        reservation: Reservation,
        *,
        price_cost: int,
        input_tokens: int,
        output_tokens: int,
        status: UsageStatus,
        usage_source: UsageSource | None = None,
        error: str | None = None,
    ) -> asyncio.Future[Settlement]: ...

    def release(self, reservation: Reservation, *, error: str) -> asyncio.Future[Settlement]:
        """End a reservation charging nothing: the request failed before anything billable."""
        return self.settle(
            reservation, price_cost=0, input_tokens=0, output_tokens=0, status=UsageStatus.FAILED, error=error[:500]
        )

    # --- claims -------------------------------------------------------------------------------

    @abc.abstractmethod
    async def begin_claim(self, target: ClaimTarget, *, final: bool = False) -> int | None: ...

    @abc.abstractmethod
    async def record_claim_tx(self, claim_id: int, *, tx_hash: str, tx_nonce: int, raw_tx: bytes) -> None: ...

    @abc.abstractmethod
    async def finish_claim(
        self,
        claim_id: int,
        *,
        status: ClaimStatus,
        error: str | None = None,
        retry_after: float | None = None,
        paid: ClaimPaid | None = None,
    ) -> None: ...
