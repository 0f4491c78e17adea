"""`migrate-ledger`: a SQLite ledger with real paid requests copied into an empty PostgreSQL
database, every row as it was (ids too), reservations left by a stopped server released first,
the id sequences set after the copied ids; a target that holds a ledger, or a server that cannot
be reached or refuses the login, is one line and exit 2, never the password."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from helpers import ChannelFactory, ProviderFactory, free_port, paid_chat

TABLES = {"ledger_meta": "key", "channels": "channel_id", "vouchers": "id", "usage": "id", "claims": "id"}
PASSWORD = "s3cret-Passw0rd"


async def migrate_command(cwd: Path, *args: str) -> tuple[int, str, str, float]:
    base = {k: os.environ[k] for k in ("PATH", "LANG", "PYTHONPATH", "SYSTEMROOT") if k in os.environ}
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "drain_provider", "migrate-ledger", *args, env=base, cwd=cwd,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode(), time.monotonic() - started


async def pg_rows(url: str, table: str, columns: list[str]) -> list[tuple[object, ...]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(f"SELECT {', '.join(columns)} FROM {table} ORDER BY {TABLES[table]}")
    finally:
        await conn.close()
    return [tuple(row) for row in rows]


async def pg_columns(url: str, table: str) -> list[str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT column_name FROM information_schema.columns WHERE table_name = $1 ORDER BY ordinal_position",
            table,
        )
    finally:
        await conn.close()
    return [row[0] for row in rows]


async def test_every_row_is_copied_with_its_ids_and_new_ids_follow(
    provider_factory: ProviderFactory,
    open_channel: ChannelFactory,
    database_urls: Callable[[], Awaitable[str]],
    tmp_path: Path,
) -> None:
    provider = await provider_factory()
    consumers = [await open_channel(provider) for _ in range(2)]
    client = provider.client()
    for consumer in consumers:
        for _ in range(2):
            await paid_chat(client, consumer)
    ledger = provider.ledger
    channel_id, voucher_id, amount = (
        await ledger.fetchall("SELECT channel_id, id, amount FROM vouchers ORDER BY id DESC LIMIT 1")
    )[0]
    now = time.time()
    await ledger.execute(
        """INSERT INTO claims (channel_id, voucher_id, amount, status, tx_hash, tx_nonce, created_at, updated_at)
           VALUES (?, ?, ?, 'confirmed', ?, 0, ?, ?)""",
        (channel_id, voucher_id, amount, "0x" + "aa" * 32, now, now),
    )
    # What a server killed mid-request leaves: a reservation, on the usage row and the channel.
    await ledger.execute(
        """INSERT INTO usage (channel_id, voucher_id, endpoint, model, status, reserved, input_tokens, started_at)
           VALUES (?, ?, 'chat', 'demo', 'reserved', 500, 10, ?)""",
        (channel_id, voucher_id, now),
    )
    await ledger.execute("UPDATE channels SET reserved = reserved + 500 WHERE channel_id = ?", (channel_id,))
    charged = (await ledger.fetchall("SELECT SUM(charged) FROM channels"))[0][0]
    assert charged > 0

    url = await database_urls()
    source = str(provider.settings.database_path)
    code, out, err, _ = await migrate_command(tmp_path, "--from", source, "--to", url)
    assert code == 0, err
    assert "vouchers 4" in out and "claims 1" in out and f"charged {charged} " in out
    assert "released 1 reservations" in out

    for table in TABLES:
        on_sqlite = {str(row[1]) for row in await ledger.fetchall(f"PRAGMA table_info({table})")}
        columns = [c for c in await pg_columns(url, table) if c in on_sqlite]  # (channels.version is PostgreSQL's)
        copied = await pg_rows(url, table, columns)
        kept = await ledger.fetchall(f"SELECT {', '.join(columns)} FROM {table} ORDER BY {TABLES[table]}")
        assert copied == [tuple(row) for row in kept], table
        assert copied or table == "claims"
    released = await pg_rows(url, "usage", ["status"])
    assert ("reserved",) not in released and ("abandoned",) in released
    assert await pg_rows(url, "channels", ["reserved"]) == [(0,), (0,)]

    # A second copy is refused: the target holds a ledger now.
    code, out, err, _ = await migrate_command(tmp_path, "--from", source, "--to", url)
    assert code == 2 and out == ""
    (line,) = err.strip().splitlines()
    assert line.startswith("drain-provider: migrate-ledger: ") and "already holds a ledger" in line

    # New rows get the ids after the copied ones.
    conn = await asyncpg.connect(url)
    try:
        top = await conn.fetchval("SELECT MAX(id) FROM vouchers")
        new_id = await conn.fetchval(
            "INSERT INTO vouchers (channel_id, amount, nonce, signature, received_at) "
            "VALUES ($1, $2, '999999', '0x', 0) RETURNING id",
            channel_id,
            amount + 1,
        )
        assert new_id == top + 1
        for table in ("usage", "claims"):
            top = await conn.fetchval(f"SELECT MAX(id) FROM {table}")
            assert await conn.fetchval(f"SELECT nextval(pg_get_serial_sequence('{table}', 'id'))") == top + 1
    finally:
        await conn.close()


def with_login(url: str, user: str, password: str, port: int | None = None) -> str:
    parts = urlsplit(url)
    netloc = f"{user}:{password}@{parts.hostname}:{port or parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


async def test_a_server_that_refuses_or_is_not_there_is_one_line_without_the_password(
    database_urls: Callable[[], Awaitable[str]], tmp_path: Path
) -> None:
    source = tmp_path / "drain.db"
    source.write_bytes(b"")  # an empty file: SQLite makes a ledger of it
    url = await database_urls()
    cases = {
        with_login(url, "nobody", PASSWORD): "refuses the login",
        with_login(url, "drain", PASSWORD, port=free_port()): "refuses connections",
        "http://example.org/db": "must be a postgresql:// URL",
    }
    for target, problem in cases.items():
        code, out, err, took = await migrate_command(tmp_path, "--from", str(source), "--to", target)
        assert code == 2 and out == "", err
        (line,) = err.strip().splitlines()
        assert line.startswith("drain-provider: migrate-ledger: ") and problem in line, line
        assert PASSWORD not in err and "Traceback" not in err
        assert took < 10


async def test_a_missing_source_is_refused_and_not_created(tmp_path: Path) -> None:
    code, _, err, _ = await migrate_command(
        tmp_path, "--from", str(tmp_path / "typo.db"), "--to", "postgresql://u@127.0.0.1:9/db"
    )
    assert code == 2 and "--from: no SQLite ledger at" in err
    assert not (tmp_path / "typo.db").exists()
