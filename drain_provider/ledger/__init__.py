"""The ledger: channels, vouchers, usage and claims, on SQLite (the default: one file, one
process) or PostgreSQL (`DATABASE_URL=postgresql://…`: several provider instances on one
database). base.py is the interface both engines implement, records.py what they hold."""

from __future__ import annotations

from pathlib import Path

from ..states import SyncMode
from .base import ENGINE_ERRORS, Ledger, new_instance_id
from .postgres import PostgresLedger, is_postgres_url, shown_url
from .records import (
    CHANNEL_COLUMNS,
    CLAIM_COLUMNS,
    CLOSING_MESSAGE,
    INT64_MAX,
    ChannelRecord,
    ClaimRecord,
    ClaimTarget,
    CloseAuthorization,
    CloseFigures,
    LedgerMismatch,
    Refusal,
    Reservation,
    Settlement,
    Totals,
    UsageFilter,
    UsageItem,
    UsageRecord,
    reservation_fit,
    shown_address,
    usage_query,
)
from .sqlite import MIGRATIONS, SQLiteLedger


def make_ledger(path: Path | str, *, url: str | None = None, synchronous: SyncMode = SyncMode.FULL) -> Ledger:
    """The ledger named by the settings, not yet open: PostgreSQL if `url` (DATABASE_URL) is set,
    else the SQLite file at `path` (DATABASE_PATH)."""
    if url:
        return PostgresLedger(url)
    return SQLiteLedger(path, synchronous=synchronous)


__all__ = [
    "CHANNEL_COLUMNS",
    "CLAIM_COLUMNS",
    "CLOSING_MESSAGE",
    "ENGINE_ERRORS",
    "INT64_MAX",
    "MIGRATIONS",
    "ChannelRecord",
    "ClaimRecord",
    "ClaimTarget",
    "CloseAuthorization",
    "CloseFigures",
    "Ledger",
    "LedgerMismatch",
    "PostgresLedger",
    "Refusal",
    "Reservation",
    "SQLiteLedger",
    "Settlement",
    "Totals",
    "UsageFilter",
    "UsageItem",
    "UsageRecord",
    "is_postgres_url",
    "make_ledger",
    "new_instance_id",
    "reservation_fit",
    "shown_address",
    "shown_url",
    "usage_query",
]
