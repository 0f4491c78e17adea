"""The SQLite ledger: channels, vouchers, usage and claims.

Writes follow Datasette's `execute_write_fn`: every write is a plain function run on ONE writer
thread that owns the only write connection, inside `BEGIN IMMEDIATE ... COMMIT` (with group
commit: see sqlwriter.py). A whole authorize or settle is therefore one function and one
transaction, and two requests on the same channel are serialised by SQLite itself, with no lock
in Python around the database. Reads use their own aiosqlite connection; in WAL mode they never
wait for the writer. Rows are read by column name.

Words: a channel's *last voucher* is the last one it accepted; nonces only go up and amounts
never down, so it is also the highest. *Settle* charges a request and ends its reservation;
*release* ends it charging nothing.

Amounts are INTEGER base units. On-chain values are uint256, but a real USDC deposit is far
below 2^63, so a deposit beyond that is clamped (we accept less, never more). Nonces may use the
whole uint256 range and are stored as decimal TEXT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
from eth_utils.address import to_checksum_address

from ..pricing import ReservationPlan
from ..protocol import ChannelClose, ChannelState, ClaimPaid, Voucher
from ..sqlwriter import Writer
from ..states import ChannelStatus, ClaimStatus, CloseKind, SyncMode, UsageSource, UsageStatus
from .base import Ledger, new_instance_id
from .records import (
    CHANNEL_COLUMNS,
    CLOSING_MESSAGE,
    INT64_MAX,
    ChannelRecord,
    ClaimTarget,
    CloseAuthorization,
    CloseFigures,
    Refusal,
    Reservation,
    Settlement,
    check_binding,
    reservation_fit,
    settle_figures,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

MIGRATIONS: list[str] = [
    # 1: the first schema.
    """
    CREATE TABLE channels (
        channel_id      TEXT PRIMARY KEY,
        consumer        TEXT NOT NULL,
        provider        TEXT NOT NULL,
        deposit         INTEGER NOT NULL,
        claimed         INTEGER NOT NULL,
        expiry          INTEGER NOT NULL,
        status          TEXT NOT NULL DEFAULT 'open',
        charged         INTEGER NOT NULL DEFAULT 0,
        reserved        INTEGER NOT NULL DEFAULT 0,
        best_amount     INTEGER NOT NULL DEFAULT 0,
        best_nonce      TEXT NOT NULL DEFAULT '0',
        best_voucher_id INTEGER,
        claim_attempts  INTEGER NOT NULL DEFAULT 0,
        claim_retry_at  REAL,
        synced_at       REAL NOT NULL,
        created_at      REAL NOT NULL
    );
    CREATE TABLE vouchers (
        id          INTEGER PRIMARY KEY,
        channel_id  TEXT NOT NULL REFERENCES channels(channel_id),
        amount      INTEGER NOT NULL,
        nonce       TEXT NOT NULL,
        signature   TEXT NOT NULL,
        received_at REAL NOT NULL
    );
    CREATE INDEX vouchers_channel_amount ON vouchers(channel_id, amount);
    CREATE TABLE usage (
        id            INTEGER PRIMARY KEY,
        channel_id    TEXT NOT NULL REFERENCES channels(channel_id),
        voucher_id    INTEGER NOT NULL REFERENCES vouchers(id),
        endpoint      TEXT NOT NULL,
        model         TEXT NOT NULL,
        status        TEXT NOT NULL,
        reserved      INTEGER NOT NULL,
        input_tokens  INTEGER NOT NULL,
        output_tokens INTEGER NOT NULL DEFAULT 0,
        usage_source  TEXT,
        price_cost    INTEGER NOT NULL DEFAULT 0,
        cost          INTEGER NOT NULL DEFAULT 0,
        error         TEXT,
        started_at    REAL NOT NULL,
        finished_at   REAL
    );
    CREATE INDEX usage_channel ON usage(channel_id);
    CREATE INDEX usage_reserved ON usage(status) WHERE status = 'reserved';
    CREATE TABLE claims (
        id          INTEGER PRIMARY KEY,
        channel_id  TEXT NOT NULL REFERENCES channels(channel_id),
        voucher_id  INTEGER NOT NULL REFERENCES vouchers(id),
        amount      INTEGER NOT NULL,
        status      TEXT NOT NULL,
        tx_hash     TEXT,
        tx_nonce    INTEGER,
        raw_tx      TEXT,
        error       TEXT,
        created_at  REAL NOT NULL,
        updated_at  REAL NOT NULL
    );
    CREATE INDEX claims_channel ON claims(channel_id);
    CREATE UNIQUE INDEX claims_one_pending ON claims(channel_id) WHERE status = 'pending';
    """,
    # 2: one name for a channel's last accepted voucher (it was "best" in places, "last" in others).
    """
    ALTER TABLE channels RENAME COLUMN best_amount TO last_amount;
    ALTER TABLE channels RENAME COLUMN best_nonce TO last_nonce;
    ALTER TABLE channels RENAME COLUMN best_voucher_id TO last_voucher_id;
    """,
    # 3: the ledger's chain and contract; what closes and claims really paid (V2's fee included).
    """
    CREATE TABLE ledger_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    ALTER TABLE channels ADD COLUMN seen_block INTEGER;
    ALTER TABLE channels ADD COLUMN fee INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE channels ADD COLUMN close_kind TEXT;
    ALTER TABLE channels ADD COLUMN refund INTEGER;
    ALTER TABLE channels ADD COLUMN close_tx TEXT;
    ALTER TABLE channels ADD COLUMN closed_at REAL;
    ALTER TABLE claims ADD COLUMN payout INTEGER;
    ALTER TABLE claims ADD COLUMN fee INTEGER;
    CREATE INDEX usage_over_reservation ON usage(id) WHERE price_cost > cost;
    """,
    # 4: each channel's contract (EIP-55): one provider serves V1 and V2 channels at once. Rows
    # from before are on the contract the ledger was bound to; `Ledger.bind` writes it in.
    """
    ALTER TABLE channels ADD COLUMN contract TEXT NOT NULL DEFAULT '';
    """,
    # 5: cooperative close: when it was asked for, and the final amount this provider signed.
    """
    ALTER TABLE channels ADD COLUMN close_requested_at REAL;
    ALTER TABLE channels ADD COLUMN close_amount INTEGER;
    ALTER TABLE channels ADD COLUMN close_signature TEXT;
    ALTER TABLE channels ADD COLUMN close_signed_at REAL;
    """,
    # 6: the request id of each paid request (X-Request-Id), to join the access log to the ledger.
    """
    ALTER TABLE usage ADD COLUMN request_id TEXT;
    """,
    # 7: one voucher per (channel, nonce) by constraint, as on PostgreSQL; the instance that made
    # each reservation (one per process; PostgreSQL ledgers are shared by several).
    """
    CREATE UNIQUE INDEX vouchers_channel_nonce ON vouchers(channel_id, nonce);
    ALTER TABLE usage ADD COLUMN instance TEXT;
    """,
]


def _sync_open(
    conn: sqlite3.Connection, channel_id: str, state: ChannelState, block: int | None, now: float
) -> ChannelRecord:
    """Take an open channel's claimed total from chain (it only grows: a stale read never
    lowers it) and note when and at which block it was seen open."""
    conn.execute(
        """UPDATE channels SET claimed = MAX(claimed, ?), synced_at = ?, seen_block = COALESCE(?, seen_block)
           WHERE channel_id = ? AND status != 'closed'""",
        (min(state.claimed, INT64_MAX), now, block, channel_id),
    )
    return _read_channel(conn, channel_id)


def _read_channel(conn: sqlite3.Connection, channel_id: str) -> ChannelRecord:
    """A channel as the write transaction sees it (it exists: the caller has just written it)."""
    row = conn.execute(f"SELECT {CHANNEL_COLUMNS} FROM channels WHERE channel_id = ?", (channel_id,)).fetchone()
    return ChannelRecord.from_row(row)


def _create_private(path: Path) -> None:
    """The ledger holds every voucher (signatures worth money) and the books: a new one is
    created readable by this user only, in a directory created 0700. SQLite gives its -wal and
    -shm files the database's mode, so creating the (empty) database file 0600 ourselves is
    enough. An existing ledger is used as it is: its owner may have chosen its mode."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


class SQLiteLedger(Ledger):
    """The embedded ledger: one file, served by one process (the instance methods are simple
    here: a start releases whatever a previous run left reserved, and this process always leads)."""

    engine = "sqlite"

    def __init__(self, path: Path | str, *, synchronous: SyncMode = SyncMode.FULL) -> None:
        self.path = self.where = str(path)
        self.instance_id = new_instance_id()
        self.synchronous = synchronous
        self._writer: Writer | None = None
        self._reader: aiosqlite.Connection | None = None

    # --- lifecycle ----------------------------------------------------------------------------

    async def open(self) -> None:
        if self.path != ":memory:":
            _create_private(Path(self.path))
        self._writer = Writer(self._connect_writer)
        await self._writer.start()
        version = await self.write(self._migrate)
        self._reader = await aiosqlite.connect(self.path)
        self._reader.row_factory = sqlite3.Row
        await self._reader.execute("PRAGMA busy_timeout = 5000")
        await self._reader.execute("PRAGMA query_only = 1")
        log.info("ledger_open path=%s schema_version=%d", self.path, version)

    async def bind(self, *, chain_id: int, contract: str, served: Sequence[str] = ()) -> None:
        """Tie the ledger to one chain, at its first start, and refuse another later: its vouchers
        are signed for that chain's EIP-712 domains, and its channel ids mean nothing elsewhere.

        The contract too is recorded at the first start (`contract`, the primary served then):
        channels stored before the ledger knew each channel's contract are on it. Later starts
        may serve more contracts beside it (V1 added beside a bound V2), but the bound contract
        must stay among those `served` (all of them; `contract` alone when not given), and so
        must every contract on which an open channel holds earnings not yet claimed: without
        it they could never be claimed."""
        served = tuple(served) or (contract,)
        wanted = {"chain_id": str(chain_id), "contract": contract.lower()}

        def bind(conn: sqlite3.Connection) -> tuple[dict[str, str], list[tuple[str, int, int]]]:
            for key, value in wanted.items():
                conn.execute("INSERT INTO ledger_meta (key, value) VALUES (?, ?) ON CONFLICT DO NOTHING", (key, value))
            found = {row["key"]: row["value"] for row in conn.execute("SELECT key, value FROM ledger_meta")}
            conn.execute(
                "UPDATE channels SET contract = ? WHERE contract = ''", (to_checksum_address(found["contract"]),)
            )
            unclaimed = conn.execute(
                """SELECT contract, COUNT(*), SUM(charged - claimed) FROM channels
                   WHERE status != 'closed' AND charged > claimed GROUP BY contract"""
            ).fetchall()
            return found, [tuple(row) for row in unclaimed]

        found, unclaimed = await self.write(bind)
        check_binding(
            self.path,
            found,
            unclaimed,
            chain_id=wanted["chain_id"],
            served=served,
            fix="set DATABASE_PATH to another file",
        )

    async def set_watched_block(self, block: int) -> None:
        await self.write(
            lambda conn: conn.execute(
                "INSERT INTO ledger_meta (key, value) VALUES ('watched_block', ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (str(block),),
            )
        )

    async def close(self) -> None:
        if self._reader is not None:
            await self._reader.close()
            self._reader = None
        if self._writer is not None:
            await self._writer.stop()
            self._writer = None

    def _connect_writer(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode = WAL")
        # FULL (the default): a committed voucher survives power loss, not only a process crash.
        # NORMAL: the last commits before a power cut may be lost; one fsync fewer per commit.
        conn.execute(f"PRAGMA synchronous = {SyncMode(self.synchronous).value}")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA busy_timeout = 5000")
        return conn

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> int:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at REAL)")
        current = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()[0]
        for version, script in enumerate(MIGRATIONS, start=1):
            if version <= current:
                continue
            for statement in script.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations VALUES (?, ?)", (version, time.time()))
            log.info("ledger_migrated version=%d", version)
        return len(MIGRATIONS)

    def write(
        self, fn: Callable[[sqlite3.Connection], T], *, before_commit: asyncio.Future[T] | None = None
    ) -> asyncio.Future[T]:
        """Run `fn(conn)` on the writer thread, all or nothing; the future resolves once it is
        committed (`before_commit`, if given, as soon as it has run). The write happens even if
        nobody awaits the future any more."""
        assert self._writer is not None, "ledger is not open"
        return self._writer.submit(fn, before_commit=before_commit)

    async def _select(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        assert self._reader is not None, "ledger is not open"
        async with self._reader.execute(sql, params) as cursor:
            return list(await cursor.fetchall())

    async def ping(self) -> None:
        await self.write(lambda conn: None)
        await self.fetchone("SELECT 1")

    async def execute(self, sql: str, params: tuple[Any, ...] = ()) -> int:
        return await self.write(lambda conn: conn.execute(sql, params).rowcount)

    # --- channels -----------------------------------------------------------------------------

    async def add_channel(
        self, channel_id: str, state: ChannelState, *, contract: str, block: int | None = None
    ) -> ChannelRecord:
        """Store an open channel the chain has just shown us on `contract` (EIP-55); a second
        call refreshes it (and keeps the contract it was stored with)."""
        assert state.exists
        now = time.time()

        def add(conn: sqlite3.Connection) -> ChannelRecord:
            conn.execute(
                """INSERT INTO channels (channel_id, consumer, provider, deposit, claimed, expiry, status,
                                         synced_at, created_at, seen_block, contract)
                   VALUES (?, ?, ?, ?, ?, ?, 'open', ?, ?, ?, ?)
                   ON CONFLICT(channel_id) DO NOTHING""",
                (
                    channel_id,
                    state.consumer,
                    state.provider,
                    min(state.deposit, INT64_MAX),
                    min(state.claimed, INT64_MAX),
                    min(state.expiry, INT64_MAX),
                    now,
                    now,
                    block,
                    contract,
                ),
            )
            return _sync_open(conn, channel_id, state, block, now)

        return await self.write(add)

    async def record_open(self, channel_id: str, state: ChannelState, *, block: int | None = None) -> ChannelRecord:
        """The chain still shows the channel open: take its claimed total."""
        assert state.exists
        return await self.write(lambda conn: _sync_open(conn, channel_id, state, block, time.time()))

    async def book_close(self, channel_id: str, close: ChannelClose | None) -> ChannelRecord | None:
        """The channel is gone from chain: mark it closed, refused from now on, and book what was
        really paid. From its ChannelClosed event: deposit - refund in total (claims plus the
        closing payout), and the closing payout's fee. Without the event (`close` None) the last
        claimed total read while it was open stands: never the zero a deleted channel reads as.
        None if the channel is not in the ledger; a second booking changes nothing."""
        now = time.time()

        def book(conn: sqlite3.Connection) -> ChannelRecord | None:
            row = conn.execute("SELECT status, deposit FROM channels WHERE channel_id = ?", (channel_id,)).fetchone()
            if row is None:
                return None
            if row["status"] != ChannelStatus.CLOSED:
                if close is None:
                    conn.execute(
                        "UPDATE channels SET status = 'closed', close_kind = ?, closed_at = ? WHERE channel_id = ?",
                        (CloseKind.UNKNOWN, now, channel_id),
                    )
                else:
                    kind = CloseKind.COOPERATIVE if close.cooperative else CloseKind.EXPIRED
                    conn.execute(
                        """UPDATE channels SET status = 'closed', claimed = MAX(claimed, ?), fee = fee + ?,
                                               close_kind = ?, refund = ?, close_tx = ?, closed_at = ?
                           WHERE channel_id = ?""",
                        (row["deposit"] - close.refund, close.fee, kind, close.refund, close.tx_hash, now, channel_id),
                    )
            return _read_channel(conn, channel_id)

        return await self.write(book)

    # --- cooperative close --------------------------------------------------------------------

    async def begin_close(self, channel_id: str) -> ChannelRecord | None:
        """Mark an open channel closing (durably, before anything else is done about the close):
        from this commit on, `authorize` refuses its vouchers. A closing or closed channel is
        left as it is. None if the channel is not in the ledger."""
        now = time.time()

        def begin(conn: sqlite3.Connection) -> ChannelRecord | None:
            conn.execute(
                "UPDATE channels SET status = ?, close_requested_at = ? WHERE channel_id = ? AND status = ?",
                (ChannelStatus.CLOSING, now, channel_id, ChannelStatus.OPEN),
            )
            row = conn.execute(f"SELECT {CHANNEL_COLUMNS} FROM channels WHERE channel_id = ?", (channel_id,))
            found = row.fetchone()
            return None if found is None else ChannelRecord.from_row(found)

        return await self.write(begin)

    def sign_close(
        self, channel_id: str, sign: Callable[[CloseFigures], CloseAuthorization]
    ) -> asyncio.Future[CloseAuthorization | None]:
        """The close authorization of a closing channel with no request in flight: the one
        stored, or the one `sign` (pure CPU: closing.py) makes of the channel's figures, stored
        in the same transaction. The figures include the amount of a claim still in flight; a
        claim cannot begin on a closing channel before its final window (`begin_claim`), so none
        can slip in after this. None if the channel is not closing or a reservation is still
        held."""
        now = time.time()

        def sign_and_store(conn: sqlite3.Connection) -> CloseAuthorization | None:
            row = conn.execute(
                """SELECT status, deposit, charged, claimed, reserved, close_amount, close_signature
                   FROM channels WHERE channel_id = ?""",
                (channel_id,),
            ).fetchone()
            if row is None:
                return None
            if row["close_signature"] is not None:
                return CloseAuthorization(row["close_amount"], row["close_signature"])
            if row["status"] != ChannelStatus.CLOSING or row["reserved"] != 0:
                return None
            claiming = conn.execute(
                "SELECT COALESCE(MAX(amount), 0) FROM claims WHERE channel_id = ? AND status = ?",
                (channel_id, ClaimStatus.PENDING),
            ).fetchone()[0]
            signed = sign(CloseFigures(row["deposit"], row["charged"], row["claimed"], claiming))
            conn.execute(
                "UPDATE channels SET close_amount = ?, close_signature = ?, close_signed_at = ? WHERE channel_id = ?",
                (signed.final_amount, signed.signature, now, channel_id),
            )
            return signed

        return self.write(sign_and_store)

    # --- the two money transactions -----------------------------------------------------------

    def authorize(
        self,
        voucher: Voucher,
        plan: ReservationPlan,
        *,
        endpoint: str,
        model: str,
        request_id: str | None = None,
        before_commit: asyncio.Future[Reservation | Refusal] | None = None,
    ) -> asyncio.Future[Reservation | Refusal]:
        """Store the voucher and reserve the request's worst case, or refuse; all or nothing.

        The caller (payments.PaymentGate) has already checked what needs no ledger state:
        signature, provider, consumer, deposit. Here are the checks that race: nonce and amount
        against the last voucher, and the headroom left by the charged total and the other
        in-flight reservations. A refused voucher changes nothing and comes back as a Refusal.
        `before_commit` hears the
        reservation before it is committed (see Writer.submit); the returned future, once it is.
        """
        now = time.time()

        def authorize(conn: sqlite3.Connection) -> Reservation | Refusal:
            row = conn.execute(
                "SELECT status, charged, reserved, last_amount, last_nonce FROM channels WHERE channel_id = ?",
                (voucher.channel_id,),
            ).fetchone()
            if row is None or row["status"] == ChannelStatus.CLOSED:
                return Refusal("channel_not_found", "The channel does not exist on chain or is closed.")
            if row["status"] == ChannelStatus.CLOSING:
                # The authoritative check: a request that passed the gate while the close was
                # being asked for is refused here, serialised with the close by SQLite.
                return Refusal("channel_closing", CLOSING_MESSAGE)
            fit = reservation_fit(
                voucher,
                plan,
                last_nonce=int(row["last_nonce"]),
                last_amount=row["last_amount"],
                in_use=row["charged"] + row["reserved"],
            )
            if isinstance(fit, Refusal):
                return fit
            amount, output_tokens = fit
            voucher_id = conn.execute(
                "INSERT INTO vouchers (channel_id, amount, nonce, signature, received_at) VALUES (?, ?, ?, ?, ?)",
                (voucher.channel_id, voucher.amount, str(voucher.nonce), voucher.signature_hex, now),
            ).lastrowid
            conn.execute(
                """UPDATE channels SET last_amount = ?, last_nonce = ?, last_voucher_id = ?, reserved = reserved + ?
                   WHERE channel_id = ?""",
                (voucher.amount, str(voucher.nonce), voucher_id, amount, voucher.channel_id),
            )
            usage_id = conn.execute(
                """INSERT INTO usage (channel_id, voucher_id, endpoint, model, status, reserved,
                                      input_tokens, started_at, request_id, instance)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (
                    voucher.channel_id,
                    voucher_id,
                    endpoint,
                    model,
                    UsageStatus.RESERVED,
                    amount,
                    plan.input_tokens,
                    now,
                    request_id,
                    self.instance_id,
                ),
            ).lastrowid
            assert usage_id is not None
            return Reservation(usage_id, voucher.channel_id, amount, output_tokens)

        return self.write(authorize, before_commit=before_commit)

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
    ) -> asyncio.Future[Settlement]:
        """Charge `price_cost`, capped by the request's own reservation (what it was allowed to
        cost when its voucher was accepted) and by the last voucher (so that the charged total
        never passes it), and end the reservation. `price_cost` is stored as given, so that what
        an upstream over-reported can be counted. Idempotent: a second settle of the same usage
        row changes nothing and reports the first one's figures."""
        now = time.time()

        def settle(conn: sqlite3.Connection) -> Settlement:
            row = conn.execute(
                """SELECT u.status, u.reserved AS own, u.cost, u.price_cost, c.deposit, c.charged, c.reserved,
                          c.last_amount
                   FROM usage u JOIN channels c ON c.channel_id = u.channel_id WHERE u.id = ?""",
                (reservation.usage_id,),
            ).fetchone()
            if row is None:  # its authorization never committed (the disk failed): nothing to undo
                log.warning("settle_unknown_reservation usage_id=%d", reservation.usage_id)
                return Settlement(0, 0, 0, 0)
            deposit, charged = row["deposit"], row["charged"]
            if row["status"] != UsageStatus.RESERVED:
                return Settlement(
                    row["cost"], charged, deposit - charged, row["price_cost"], row["last_amount"], row["reserved"]
                )
            settled, capped = settle_figures(
                price_cost,
                own=row["own"],
                deposit=deposit,
                charged=charged,
                reserved=row["reserved"],
                last_amount=row["last_amount"],
            )
            if capped:  # (above the reservation, payments.Charge logs it)
                log.warning(
                    "charge_capped_by_voucher usage_id=%d price_cost=%d reserved=%d charged=%d",
                    reservation.usage_id,
                    price_cost,
                    row["own"],
                    settled.cost,
                )
            conn.execute(
                "UPDATE channels SET charged = charged + ?, reserved = reserved - ? WHERE channel_id = ?",
                (settled.cost, row["own"], reservation.channel_id),
            )
            conn.execute(
                """UPDATE usage SET status = ?, input_tokens = ?, output_tokens = ?, usage_source = ?,
                                    price_cost = ?, cost = ?, error = ?, finished_at = ?
                   WHERE id = ?""",
                (
                    status,
                    input_tokens,
                    output_tokens,
                    usage_source,
                    price_cost,
                    settled.cost,
                    error,
                    now,
                    reservation.usage_id,
                ),
            )
            return settled

        return self.write(settle)

    async def start_instance(self) -> int:
        """At start-up: reservations of requests that were in flight when the process died are
        released (their outcome is unknown, and the consumer is never charged on a guess). One
        process serves a SQLite ledger, so every reservation found is one of those."""
        now = time.time()

        def release(conn: sqlite3.Connection) -> int:
            count = conn.execute(
                "UPDATE usage SET status = ?, finished_at = ? WHERE status = ?",
                (UsageStatus.ABANDONED, now, UsageStatus.RESERVED),
            ).rowcount
            conn.execute("UPDATE channels SET reserved = 0 WHERE reserved != 0")
            return count

        count = await self.write(release)
        if count:
            log.warning("reservations_released count=%d reason=restart", count)
        return count

    async def heartbeat(self) -> bool:
        return True

    async def reap_dead_instances(self, older_than: float) -> int:
        return 0

    async def stop_instance(self) -> None:
        pass

    async def try_lead(self) -> bool:
        return True

    async def resign(self) -> None:
        pass

    # --- claims -------------------------------------------------------------------------------

    async def begin_claim(self, target: ClaimTarget, *, final: bool = False) -> int | None:
        """A pending claims row for `target`, or None if the channel already has one in flight (in
        this process or another: the unique index on pending claims decides), or if it is closing
        and this is not its `final` claim: its consumer may still close it with the final amount
        we signed, and a claim above that amount would make the close revert. Checked here, in
        the transaction, because the close may have been asked for since `target` was read."""
        now = time.time()

        def begin(conn: sqlite3.Connection) -> int | None:
            row = conn.execute("SELECT status FROM channels WHERE channel_id = ?", (target.channel_id,)).fetchone()
            if row is None or row["status"] == ChannelStatus.CLOSED:
                return None
            if row["status"] == ChannelStatus.CLOSING and not final:
                return None
            try:
                cursor = conn.execute(
                    """INSERT INTO claims (channel_id, voucher_id, amount, status, created_at, updated_at)
                       VALUES (?, ?, ?, ?, ?, ?)""",
                    (target.channel_id, target.voucher_id, target.voucher.amount, ClaimStatus.PENDING, now, now),
                )
            except sqlite3.IntegrityError:
                return None
            return cursor.lastrowid

        return await self.write(begin)

    async def record_claim_tx(self, claim_id: int, *, tx_hash: str, tx_nonce: int, raw_tx: bytes) -> None:
        """Written before the transaction is sent: a crash after this line is reconciled from the
        chain by its hash, and the same signed bytes can be sent again (never a second claim)."""
        now = time.time()
        await self.write(
            lambda conn: conn.execute(
                "UPDATE claims SET tx_hash = ?, tx_nonce = ?, raw_tx = ?, updated_at = ? WHERE id = ?",
                (tx_hash, tx_nonce, "0x" + raw_tx.hex(), now, claim_id),
            )
        )

    async def finish_claim(
        self,
        claim_id: int,
        *,
        status: ClaimStatus,
        error: str | None = None,
        retry_after: float | None = None,
        paid: ClaimPaid | None = None,
    ) -> None:
        """Close a claim. A confirmed one clears the channel's backoff and books what its receipt
        says was paid and the fee taken; any other sets the backoff to `retry_after` seconds."""
        now = time.time()

        def finish(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE claims SET status = ?, error = ?, updated_at = ?, payout = ?, fee = ? WHERE id = ?",
                (
                    status,
                    error[:500] if error else None,
                    now,
                    paid.payout if paid else None,
                    paid.fee if paid else None,
                    claim_id,
                ),
            )
            if status is ClaimStatus.CONFIRMED:
                conn.execute(
                    """UPDATE channels SET claim_attempts = 0, claim_retry_at = NULL, fee = fee + ?
                       WHERE channel_id = (SELECT channel_id FROM claims WHERE id = ?)""",
                    (paid.fee if paid else 0, claim_id),
                )
            else:
                conn.execute(
                    """UPDATE channels SET claim_attempts = claim_attempts + 1, claim_retry_at = ?
                       WHERE channel_id = (SELECT channel_id FROM claims WHERE id = ?)""",
                    (now + (retry_after or 0), claim_id),
                )

        await self.write(finish)

    # --- reports and upkeep ---------------------------------------------------------------------
