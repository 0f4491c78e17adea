"""`python -m drain_provider migrate-ledger --to postgresql://…`: the SQLite ledger copied into an
empty PostgreSQL database, for an operator who moves from one process to several instances.

The SQLite file is first opened as the server opens it (migrated to its newest schema), and what
a crashed or stopped server left reserved is released as a start would (`start_instance`: the
outcome of those requests is unknown, and a consumer is never charged on a guess). Hence: stop
the server first. The PostgreSQL database is opened as an instance opens it (its schema created
or migrated), and must hold no channel, voucher, usage row nor claim: the copy never merges two
ledgers. Every row is copied with its id in one PostgreSQL transaction, the id sequences are set
after the copied ids, and the counts and money sums of both sides must then agree, or the copy
is rolled back. Nothing is ever written back to the SQLite file except the released reservations.
"""

from __future__ import annotations

import asyncio
import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from .checks import LEDGER_CONNECT_TIMEOUT, postgres_problem
from .ledger import ENGINE_ERRORS, PostgresLedger, SQLiteLedger, is_postgres_url, shown_url

if TYPE_CHECKING:
    from asyncpg import Record
    from asyncpg.pool import PoolConnectionProxy

    Connection = PoolConnectionProxy[Record]

# In the order the foreign keys need (claims and usage name vouchers, vouchers name channels).
TABLES = ("ledger_meta", "channels", "vouchers", "usage", "claims")
IDENTITY_TABLES = ("vouchers", "usage", "claims")
# What must agree on both sides once copied: (name, table, SQL expression).
FIGURES = (
    ("channels", "channels", "COUNT(*)"),
    ("charged", "channels", "COALESCE(SUM(charged), 0)"),
    ("claimed", "channels", "COALESCE(SUM(claimed), 0)"),
    ("reserved", "channels", "COALESCE(SUM(reserved), 0)"),
    ("deposits", "channels", "COALESCE(SUM(deposit), 0)"),
    ("vouchers", "vouchers", "COUNT(*)"),
    ("voucher amounts", "vouchers", "COALESCE(SUM(amount), 0)"),
    ("usage", "usage", "COUNT(*)"),
    ("usage reserved", "usage", "COALESCE(SUM(reserved), 0)"),
    ("usage cost", "usage", "COALESCE(SUM(cost), 0)"),
    ("usage price cost", "usage", "COALESCE(SUM(price_cost), 0)"),
    ("claims", "claims", "COUNT(*)"),
    ("claim amounts", "claims", "COALESCE(SUM(amount), 0)"),
    ("ledger_meta", "ledger_meta", "COUNT(*)"),
)
BOUND_KEYS = ("chain_id", "contract")


class MigrateError(Exception):
    """Why nothing was copied: one line, exit 2."""


@dataclass(frozen=True)
class Migrated:
    rows: dict[str, int]
    charged: int
    released: int


async def _sqlite_rows(ledger: SQLiteLedger, table: str, columns: list[str]) -> list[tuple[object, ...]]:
    names = ", ".join(columns)
    order = "key" if table == "ledger_meta" else ("channel_id" if table == "channels" else "id")
    return await ledger.fetchall(f"SELECT {names} FROM {table} ORDER BY {order}")


async def _figures_sqlite(ledger: SQLiteLedger) -> dict[str, int]:
    return {name: int((await ledger.fetchall(f"SELECT {expr} FROM {table}"))[0][0]) for name, table, expr in FIGURES}


async def _figures_pg(conn: Connection) -> dict[str, int]:
    return {name: int(await conn.fetchval(f"SELECT {expr} FROM {table}")) for name, table, expr in FIGURES}


async def _columns(conn: Connection, table: str) -> list[str]:
    rows = await conn.fetch(
        """SELECT column_name FROM information_schema.columns
           WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position""",
        table,
    )
    return [row["column_name"] for row in rows]


async def _refuse_unless_empty(conn: Connection, source_meta: dict[str, str], where: str) -> None:
    held = [t for t in TABLES[1:] if await conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {t})")]
    if held:
        raise MigrateError(f"{where} already holds a ledger ({', '.join(held)}): the copy goes into an empty one")
    target_meta = {row["key"]: row["value"] for row in await conn.fetch("SELECT key, value FROM ledger_meta")}
    for key in BOUND_KEYS:
        if key in target_meta and key in source_meta and target_meta[key] != source_meta[key]:
            raise MigrateError(f"{where} is bound to another {key.replace('_', ' ')} than the SQLite ledger")


async def _copy(conn: Connection, source: SQLiteLedger, where: str) -> tuple[int, dict[str, int]]:
    """Every row of every table, with its ids, inside the caller's transaction: the reservations
    released in the SQLite ledger first, and the rows per table."""
    meta = {str(k): str(v) for k, v in await source.fetchall("SELECT key, value FROM ledger_meta")}
    await _refuse_unless_empty(conn, meta, where)
    released = await source.start_instance()  # only once the copy is sure to be tried
    await conn.executemany(
        "INSERT INTO ledger_meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        sorted(meta.items()),
    )
    counts = {"ledger_meta": len(meta)}
    for table in TABLES[1:]:
        # The columns both sides have (PostgreSQL's own, such as channels.version, keep their defaults).
        kept = {str(row[1]) for row in await source.fetchall(f"PRAGMA table_info({table})")}
        columns = [column for column in await _columns(conn, table) if column in kept]
        rows = await _sqlite_rows(source, table, columns)
        if rows:
            await conn.copy_records_to_table(table, records=rows, columns=columns)
        counts[table] = len(rows)
    for table in IDENTITY_TABLES:
        # The next id after the copied ones (is_called false on an empty table: the next is 1).
        await conn.execute(
            f"""SELECT setval(pg_get_serial_sequence('{table}', 'id'),
                              COALESCE((SELECT MAX(id) FROM {table}), 1),
                              (SELECT MAX(id) FROM {table}) IS NOT NULL)"""
        )
    return released, counts


async def migrate(source_path: Path, url: str) -> Migrated:
    """Copy the SQLite ledger at `source_path` into the empty PostgreSQL database at `url`."""
    where = shown_url(url)
    source = SQLiteLedger(source_path)
    target = PostgresLedger(url)
    try:
        try:
            await source.open()
        except (sqlite3.Error, OSError) as exc:
            raise MigrateError(f"--from: {source_path} cannot be opened as a ledger ({type(exc).__name__})") from None
        try:
            await asyncio.wait_for(target.open(), LEDGER_CONNECT_TIMEOUT)
        except ENGINE_ERRORS as exc:
            raise MigrateError(f"--to: {where} {postgres_problem(exc)}") from None
        try:
            async with target.pool.acquire() as conn, conn.transaction():
                released, counts = await _copy(conn, source, where)
                before, after = await _figures_sqlite(source), await _figures_pg(conn)
                if before != after:
                    differ = ", ".join(f"{k} {before[k]} != {after[k]}" for k in before if before[k] != after[k])
                    raise MigrateError(f"the copy does not add up ({differ}); nothing was written to {where}")
        except ENGINE_ERRORS as exc:
            failed = f"{type(exc).__name__}: {exc}"
            raise MigrateError(f"the copy failed ({failed}); nothing was written to {where}") from None
        return Migrated(counts, before["charged"], released)
    finally:
        await target.close()
        await source.close()


def run_migrate(source_path: Path, url: str) -> int:
    """The command: a short summary, exit 0; or one line, exit 2."""
    try:
        valid = is_postgres_url(url) and bool(urlsplit(url).hostname)
    except ValueError:
        valid = False
    try:
        if not valid:
            raise MigrateError("--to: must be a postgresql:// URL with a host (postgresql://user:password@host/db)")
        if not source_path.is_file():
            raise MigrateError(f"--from: no SQLite ledger at {source_path}")
        done = asyncio.run(migrate(source_path, url))
    except MigrateError as exc:
        print(f"drain-provider: migrate-ledger: {exc}", file=sys.stderr)
        return 2
    rows = ", ".join(f"{table} {count}" for table, count in done.rows.items())
    print(f"migrated {source_path} to {shown_url(url)}: {rows}; charged {done.charged} (base units), sums checked")
    if done.released:
        print(f"released {done.released} reservations left in the SQLite ledger (as a start would)")
    return 0
