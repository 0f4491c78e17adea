"""The ledger's reads, written once in the SQL both engines speak (`?` placeholders; the
PostgreSQL engine rewrites them): each engine gives `_select`, and its own writes. Reads never
decide money: authorize and settle read inside their own statements or transactions."""

from __future__ import annotations

import abc
from typing import Any

from ..protocol import Voucher
from ..states import ChannelStatus, ClaimStatus, UsageStatus
from .records import (
    CHANNEL_COLUMNS,
    CLAIM_COLUMNS,
    INT64_MAX,
    ChannelRecord,
    ClaimRecord,
    ClaimTarget,
    Row,
    Totals,
    UsageFilter,
    UsageItem,
    UsageRecord,
    as_dict,
    usage_query,
    voucher_from_row,
)

# A sum of money as an integer on both engines (PostgreSQL's SUM of BIGINT is NUMERIC), of the
# rows `where` keeps; and the part of one amount above another (SQLite's scalar MAX(a, b) is
# PostgreSQL's GREATEST: a CASE is both).
_ABOVE = "CASE WHEN {0} > {1} THEN {0} - {1} ELSE 0 END"


def _money(expression: str, where: str | None = None) -> str:
    kept = f" FILTER (WHERE {where})" if where else ""
    return f"CAST(COALESCE(SUM({expression}){kept}, 0) AS BIGINT)"


class SharedReads(abc.ABC):
    """The read-only half of the Ledger interface (see base.py for what each promises)."""

    @abc.abstractmethod
    async def _select(self, sql: str, params: tuple[Any, ...] = ()) -> list[Row]:
        """Rows (read by column name) of a read-only query with `?` placeholders."""

    async def fetchall(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Any read-only query, rows as plain tuples (reports, health checks, tests)."""
        return [tuple(row) for row in await self._select(sql, params)]

    async def fetchone(self, sql: str, params: tuple[Any, ...] = ()) -> tuple[Any, ...] | None:
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None

    async def watched_block(self) -> int | None:
        """The first block whose ChannelClosed events the chain watcher has not read."""
        row = await self.fetchone("SELECT value FROM ledger_meta WHERE key = 'watched_block'")
        return None if row is None else int(row[0])

    async def get_channel(self, channel_id: str) -> ChannelRecord | None:
        rows = await self._select(f"SELECT {CHANNEL_COLUMNS} FROM channels WHERE channel_id = ?", (channel_id,))
        return ChannelRecord.from_row(rows[0]) if rows else None

    async def seen_block(self, channel_id: str) -> int | None:
        """The last block at which the chain showed the channel open (where to look for its close)."""
        row = await self.fetchone("SELECT seen_block FROM channels WHERE channel_id = ?", (channel_id,))
        return None if row is None or row[0] is None else int(row[0])

    async def open_among(self, channel_ids: set[str]) -> dict[str, str]:
        """Which of `channel_ids` are channels of this ledger open on chain (closing ones too),
        with each one's contract."""
        if not channel_ids:
            return {}
        marks = ", ".join("?" * len(channel_ids))
        sql = f"SELECT channel_id, contract FROM channels WHERE status != 'closed' AND channel_id IN ({marks})"
        return {row[0]: row[1] for row in await self.fetchall(sql, tuple(channel_ids))}

    async def usage(self, channel_id: str, *, limit: int, before: int | None = None) -> list[UsageItem]:
        """A channel's paid requests, newest first, `limit` of them, with ids below `before`."""
        rows = await self._select(
            """SELECT u.id, u.started_at, u.endpoint, u.model, u.status, u.input_tokens, u.output_tokens, u.cost,
                      v.nonce, v.amount
               FROM usage u JOIN vouchers v ON v.id = u.voucher_id
               WHERE u.channel_id = ? AND u.id < ? ORDER BY u.id DESC LIMIT ?""",
            (channel_id, INT64_MAX if before is None else before, limit),
        )
        return [
            UsageItem(
                id=row["id"],
                created_at=int(row["started_at"]),
                endpoint=row["endpoint"],
                model=row["model"],
                status=UsageStatus(row["status"]),
                input_tokens=row["input_tokens"],
                output_tokens=row["output_tokens"],
                cost=row["cost"],
                nonce=int(row["nonce"]),
                voucher_amount=row["amount"],
            )
            for row in rows
        ]

    async def usage_page(self, wanted: UsageFilter) -> list[UsageRecord]:
        """Every channel's paid requests, as `wanted` filters them (newest first)."""
        return [UsageRecord.from_row(row) for row in await self._select(*usage_query(wanted))]

    async def _claim_targets(self, where: str, params: tuple[Any, ...]) -> list[ClaimTarget]:
        rows = await self._select(
            f"""SELECT c.channel_id, c.expiry, c.charged, c.claimed, c.reserved, c.status, v.id AS voucher_id,
                       v.amount, v.nonce, v.signature, c.contract
                FROM channels c
                JOIN vouchers v ON v.id = (
                    SELECT id FROM vouchers WHERE channel_id = c.channel_id AND amount >= c.charged
                                                  AND amount > c.claimed
                    ORDER BY amount, id LIMIT 1)
                WHERE c.status != 'closed' AND c.charged > c.claimed
                  AND NOT EXISTS (SELECT 1 FROM claims k WHERE k.channel_id = c.channel_id AND k.status = 'pending')
                  AND ({where})
                ORDER BY c.expiry""",
            params,
        )
        return [
            ClaimTarget(
                row["channel_id"],
                row["expiry"],
                row["charged"],
                row["claimed"],
                row["reserved"],
                row["voucher_id"],
                voucher_from_row(row),
                row["contract"],
                closing=row["status"] == ChannelStatus.CLOSING,
            )
            for row in rows
        ]

    async def claim_targets(
        self, *, provider: str, threshold: int, final_after: float, now: float, force: bool = False
    ) -> list[ClaimTarget]:
        """Channels of `provider` that may be due for a claim (claim_policy decides): unclaimed
        earnings at the threshold, or any on a channel whose expiry is before `final_after`
        (its last claim). Channels in backoff after a failed claim wait for it to pass, unless
        `force`, which returns every channel with earnings."""
        if force:
            return await self._claim_targets("c.provider = ?", (provider,))
        return await self._claim_targets(
            """c.provider = ? AND (c.charged - c.claimed >= ? OR c.expiry <= ?)
               AND (c.claim_retry_at IS NULL OR c.claim_retry_at <= ?)""",
            (provider, threshold, final_after, now),
        )

    async def claim_attempts(self, channel_id: str) -> int:
        row = await self.fetchone("SELECT claim_attempts FROM channels WHERE channel_id = ?", (channel_id,))
        return int(row[0]) if row else 0

    async def claims(self, *, status: ClaimStatus | None = None, limit: int = 100) -> list[ClaimRecord]:
        where, params = ("WHERE status = ?", (status,)) if status else ("", ())
        rows = await self._select(
            f"SELECT {CLAIM_COLUMNS} FROM claims {where} ORDER BY id DESC LIMIT ?", (*params, limit)
        )
        return [ClaimRecord.from_row(row) for row in rows]

    async def channels_to_refresh(self, *, synced_before: float, limit: int = 500) -> list[tuple[str, str]]:
        """Open channels holding vouchers above what the chain has claimed, not read for a while:
        the ones whose closing or claiming elsewhere we must not miss; (channel id, contract)."""
        rows = await self._select(
            """SELECT channel_id, contract FROM channels
               WHERE status != 'closed' AND last_amount > claimed AND synced_at < ?
               ORDER BY synced_at LIMIT ?""",
            (synced_before, limit),
        )
        return [(row["channel_id"], row["contract"]) for row in rows]

    async def totals(self) -> Totals:
        channels = await self._select(
            f"""SELECT {_money("charged")} AS earned, {_money("claimed")} AS claimed, {_money("fee")} AS fee,
                      {_money(_ABOVE.format("claimed", "charged"))} AS credit_taken,
                      {_money(_ABOVE.format("charged", "claimed"), "status != 'closed'")} AS unclaimed,
                      {_money(_ABOVE.format("charged", "claimed"), "status = 'closed'")} AS lost,
                      {_money("reserved")} AS reserved,
                      COUNT(*) FILTER (WHERE status = 'open') AS open_channels,
                      COUNT(*) FILTER (WHERE status = 'closing') AS closing_channels,
                      COUNT(*) FILTER (WHERE status = 'closed') AS closed_channels
               FROM channels"""
        )
        over = await self._select(
            f"""SELECT COUNT(*) AS over_reservation_requests,
                      {_money("price_cost - cost")} AS over_reservation_amount
               FROM usage WHERE price_cost > cost"""
        )
        return Totals(**as_dict(channels[0]), **as_dict(over[0]))

    async def channels(self, *, limit: int = 500) -> list[ChannelRecord]:
        rows = await self._select(f"SELECT {CHANNEL_COLUMNS} FROM channels ORDER BY created_at DESC LIMIT ?", (limit,))
        return [ChannelRecord.from_row(row) for row in rows]

    async def last_vouchers(self, *, limit: int = 500) -> list[tuple[ChannelRecord, Voucher]]:
        """Each channel with its last accepted voucher."""
        channel_columns = ", ".join("c." + c for c in CHANNEL_COLUMNS.split(", "))
        rows = await self._select(
            f"""SELECT {channel_columns}, v.amount, v.nonce, v.signature
                FROM channels c JOIN vouchers v ON v.id = c.last_voucher_id
                ORDER BY c.created_at DESC LIMIT ?""",
            (limit,),
        )
        return [(ChannelRecord.from_row(row), voucher_from_row(row)) for row in rows]
