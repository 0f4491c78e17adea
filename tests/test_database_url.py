"""DATABASE_URL for the operator: a PostgreSQL ledger that cannot be used stops every command in
one line naming DATABASE_URL (its password never shown), within seconds; `doctor` looks at the
database without creating anything; `backup` points to pg_dump; `usage` reads through the
ledger; the start-up log says which ledger, and where."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from eth_account import Account
from helpers import free_port
from test_startup import ENV, cli, one_line

from drain_provider.checks import Result, inspect_postgres
from drain_provider.config import Settings
from drain_provider.ledger import PostgresLedger

PASSWORD = "s3cret-Passw0rd"


def with_login(url: str, user: str, *, port: int | None = None, database: str | None = None) -> str:
    parts = urlsplit(url)
    netloc = f"{user}:{PASSWORD}@{parts.hostname}:{port or parts.port}"
    return urlunsplit(parts._replace(netloc=netloc, path=f"/{database}" if database else parts.path))


@pytest.mark.parametrize("command", ["serve", "status", "claim"])
async def test_a_closed_port_is_one_line_naming_database_url(tmp_path: Path, command: str) -> None:
    url = f"postgresql://drain:{PASSWORD}@127.0.0.1:{free_port()}/drain"
    started = time.monotonic()
    run = await asyncio.to_thread(cli, [command], {**ENV, "DATABASE_URL": url}, tmp_path)
    one_line(run, "DATABASE_URL: postgresql://drain:***@127.0.0.1:", "refuses connections")
    assert PASSWORD not in run.stderr + run.stdout
    assert time.monotonic() - started < 10


async def test_a_refused_login_a_missing_database_and_not_postgresql(
    tmp_path: Path, database_urls: Callable[[], Awaitable[str]]
) -> None:
    url = await database_urls()

    async def http(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        writer.close()

    not_postgres = await asyncio.start_server(http, "127.0.0.1", 0)
    http_port = not_postgres.sockets[0].getsockname()[1]
    cases = {
        with_login(url, "nobody"): "refuses the login: check the user and password",
        with_login(url, "drain", database="no_such_db"): "has no such database",
        with_login(url, "drain", port=http_port): "cannot be used",
    }
    async with not_postgres:
        for target, problem in cases.items():
            started = time.monotonic()
            run = await asyncio.to_thread(cli, ["serve"], {**ENV, "DATABASE_URL": target}, tmp_path)
            one_line(run, "DATABASE_URL: postgresql://", problem)
            assert PASSWORD not in run.stderr + run.stdout
            assert time.monotonic() - started < 10


async def test_doctor_looks_at_the_database_and_creates_nothing(
    database_urls: Callable[[], Awaitable[str]], tmp_path: Path
) -> None:
    url = await database_urls()
    settings = Settings(
        provider_private_key=bytes(Account.create().key),
        chain_id=31337,
        drain_contract="0x" + "ab" * 20,
        contract_version="v2",
        rpc_url=None,
        database_path=tmp_path / "unused.db",
        database_url=url,
    )
    check = await inspect_postgres(settings)
    assert check.result is Result.OK and "no ledger yet" in check.detail, check
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval("SELECT COUNT(*) FROM pg_tables WHERE schemaname = 'public'") == 0
    finally:
        await conn.close()

    ledger = PostgresLedger(url)
    await ledger.open()
    try:
        check = await inspect_postgres(settings)
        assert (check.result, check.detail) == (Result.OK, f"{ledger.where}: schema version 1, not bound yet")
        for key, value in (("chain_id", "31337"), ("contract", "0x" + "ab" * 20)):
            await ledger.execute("INSERT INTO ledger_meta (key, value) VALUES (?, ?)", (key, value))
    finally:
        await ledger.close()
    check = await inspect_postgres(settings)
    assert check.result is Result.OK and check.detail.endswith("bound to this chain and contract")
    check = await inspect_postgres(replace(settings, drain_contract="0x" + "cd" * 20, contracts=()))
    assert check.result is Result.FAIL and "belongs to chain 31337" in check.detail and "DATABASE_URL" in check.fix

    refused = await inspect_postgres(replace(settings, database_url=with_login(url, "nobody")))
    assert refused.result is Result.FAIL and "refuses the login" in refused.detail
    assert PASSWORD not in refused.detail + refused.fix


def test_backup_with_database_url_points_to_pg_dump(tmp_path: Path) -> None:
    run = cli(["backup"], {"DATABASE_URL": f"postgresql://drain:{PASSWORD}@127.0.0.1:9/drain"}, tmp_path)
    assert run.returncode == 2 and run.stdout == ""
    (line,) = run.stderr.strip().splitlines()
    assert "pg_dump" in line and PASSWORD not in line


async def test_usage_reads_a_postgresql_ledger(database_urls: Callable[[], Awaitable[str]], tmp_path: Path) -> None:
    url = await database_urls()
    ledger = PostgresLedger(url)
    await ledger.open()
    channel = "0x" + "12" * 32
    try:
        await ledger.execute(
            """INSERT INTO channels (channel_id, consumer, provider, deposit, claimed, expiry, synced_at, created_at)
               VALUES (?, ?, ?, 1000000, 0, 9999999999, 0, 0)""",
            (channel, "0x" + "01" * 20, "0x" + "02" * 20),
        )
        await ledger.execute(
            "INSERT INTO vouchers (channel_id, amount, nonce, signature, received_at) VALUES (?, 500, '1', '0x', 0)",
            (channel,),
        )
        await ledger.execute(
            """INSERT INTO usage (channel_id, voucher_id, endpoint, model, status, reserved, input_tokens,
                                  output_tokens, cost, price_cost, started_at, finished_at, request_id)
               VALUES (?, 1, 'chat', 'demo-model', 'settled', 500, 12, 34, 321, 321, 1700000000, 1700000001,
                       'req-1')""",
            (channel,),
        )
    finally:
        await ledger.close()
    run = cli(["usage", "--json"], {"DATABASE_URL": url}, tmp_path)
    assert run.returncode == 0, run.stderr
    (row,) = run.stdout.strip().splitlines()
    assert '"requestId": "req-1"' in row and '"cost": "321"' in row and '"model": "demo-model"' in row

    run = cli(["usage"], {"DATABASE_URL": with_login(url, "drain", port=free_port())}, tmp_path)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    (line,) = run.stderr.strip().splitlines()
    assert "DATABASE_URL: postgresql://drain:***@" in line and "refuses connections" in line
