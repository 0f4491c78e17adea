"""Group commit: jobs that wait together commit together, a failing job is undone alone, and no
caller hears back before its write is committed."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from drain_provider.sqlwriter import Writer


def connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE IF NOT EXISTS t (k INTEGER PRIMARY KEY, v TEXT)")
    return conn


@pytest.fixture
async def writer(tmp_path: Path) -> AsyncIterator[Writer]:
    w = Writer(lambda: connect(tmp_path / "w.db"))
    await w.start()
    yield w
    await w.stop()


def committed(tmp_path: Path) -> list[tuple[int, str]]:
    with sqlite3.connect(tmp_path / "w.db") as conn:
        return conn.execute("SELECT k, v FROM t ORDER BY k").fetchall()


async def test_concurrent_jobs_share_commits_and_each_gets_its_result(writer: Writer, tmp_path: Path) -> None:
    def insert(k: int):  # type: ignore[no-untyped-def]
        def job(conn: sqlite3.Connection) -> int:
            conn.execute("INSERT INTO t VALUES (?, ?)", (k, f"v{k}"))
            return k * 10

        return job

    before = writer.batches
    results = await asyncio.gather(*(writer.run(insert(k)) for k in range(500)))
    assert results == [k * 10 for k in range(500)]
    assert len(committed(tmp_path)) == 500
    # Submitted in one turn of the event loop: one commit per MAX_BATCH jobs.
    assert writer.batches - before == 2


async def test_a_failing_job_is_rolled_back_alone(writer: Writer, tmp_path: Path) -> None:
    def good(k: int):  # type: ignore[no-untyped-def]
        return lambda conn: conn.execute("INSERT INTO t VALUES (?, 'ok')", (k,)).rowcount

    def bad(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO t VALUES (100, 'half done')")
        raise ValueError("refused")

    outcomes = await asyncio.gather(writer.run(good(1)), writer.run(bad), writer.run(good(2)), return_exceptions=True)
    assert outcomes[0] == 1 and outcomes[2] == 1
    assert isinstance(outcomes[1], ValueError)
    assert committed(tmp_path) == [(1, "ok"), (2, "ok")]
    assert writer.replays == 1  # the batch ran again, with a savepoint around each job


async def test_the_result_arrives_only_after_the_commit(writer: Writer, tmp_path: Path) -> None:
    await writer.run(lambda conn: conn.execute("INSERT INTO t VALUES (7, 'durable')"))
    # Another connection, as another process would after a crash, sees it already.
    assert committed(tmp_path) == [(7, "durable")]


async def test_a_broken_database_fails_every_call(tmp_path: Path) -> None:
    def broken() -> sqlite3.Connection:
        raise sqlite3.OperationalError("unable to open database file")

    w = Writer(broken)
    with pytest.raises(sqlite3.OperationalError):
        await w.start()
    with pytest.raises(sqlite3.OperationalError):
        await w.run(lambda conn: None)


class GatedConnection(sqlite3.Connection):
    """A connection whose COMMIT waits until the test opens the gate."""

    gate = threading.Event()

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql == "COMMIT":
            assert self.gate.wait(10)
        return super().execute(sql, *args)


async def test_ran_hears_before_the_commit_and_the_future_after_it(tmp_path: Path) -> None:
    def connect_gated() -> sqlite3.Connection:
        conn = sqlite3.connect(
            tmp_path / "w.db", isolation_level=None, check_same_thread=False, factory=GatedConnection
        )
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("CREATE TABLE IF NOT EXISTS t (k INTEGER PRIMARY KEY, v TEXT)")
        return conn

    GatedConnection.gate.set()
    writer = Writer(connect_gated)
    await writer.start()
    GatedConnection.gate.clear()
    before_commit: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    durable = writer.submit(
        lambda conn: conn.execute("INSERT INTO t VALUES (5, 'x')").rowcount, before_commit=before_commit
    )
    assert await before_commit == 1
    # Heard before the COMMIT: nothing is durable yet, and the future waits for it.
    assert committed(tmp_path) == []
    await asyncio.sleep(0.05)
    assert not durable.done()
    GatedConnection.gate.set()
    assert await durable == 1
    assert committed(tmp_path) == [(5, "x")]
    await writer.stop()


async def test_a_failed_commit_fails_the_future_after_before_commit_had_a_result(tmp_path: Path) -> None:
    def connect_with_foreign_keys() -> sqlite3.Connection:
        conn = connect(tmp_path / "w.db")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("CREATE TABLE IF NOT EXISTS parent (id INTEGER PRIMARY KEY)")
        conn.execute("CREATE TABLE IF NOT EXISTS child (parent_id INTEGER REFERENCES parent(id))")
        return conn

    writer = Writer(connect_with_foreign_keys)
    await writer.start()

    def dangling(conn: sqlite3.Connection) -> str:
        # A foreign key checked at COMMIT: the statement succeeds, the COMMIT fails.
        conn.execute("PRAGMA defer_foreign_keys = ON")
        conn.execute("INSERT INTO child VALUES (42)")
        return "ran"

    before_commit: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    durable = writer.submit(dangling, before_commit=before_commit)
    assert await before_commit == "ran"
    with pytest.raises(sqlite3.IntegrityError):
        await durable
    with sqlite3.connect(tmp_path / "w.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM child").fetchone() == (0,)
    # The writer goes on.
    assert await writer.run(lambda conn: conn.execute("INSERT INTO t VALUES (6, 'after')").rowcount) == 1
    await writer.stop()


async def test_a_refused_job_tells_before_commit_and_the_future_alike(writer: Writer) -> None:
    def refuse(conn: sqlite3.Connection) -> None:
        raise LookupError("no")

    before_commit: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    durable = writer.submit(refuse, before_commit=before_commit)
    with pytest.raises(LookupError):
        await before_commit
    with pytest.raises(LookupError):
        await durable
