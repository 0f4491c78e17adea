"""One writer thread for SQLite, with group commit.

Every write to the ledger is a plain function of a sqlite3 connection, run on a single thread
that owns the only write connection (Datasette's `execute_write_fn`). What that thread adds is
group commit: the functions waiting in its queue when it wakes up run together in one
`BEGIN IMMEDIATE ... COMMIT`, each inside its own SAVEPOINT so that one that raises is undone
alone. Under load that is one commit (one fsync with synchronous=FULL) and one wake-up of the
event loop for a whole batch, instead of one per request. Every caller still gets its result
only after the COMMIT that made its write durable.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_BATCH = 256


@dataclass
class _Job:
    fn: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]


def _deliver(outcomes: list[tuple[_Job, Any, BaseException | None]]) -> None:
    for job, result, error in outcomes:
        if job.future.cancelled():
            continue
        if error is None:
            job.future.set_result(result)
        else:
            job.future.set_exception(error)


class Writer:
    def __init__(self, connect: Callable[[], sqlite3.Connection], *, name: str = "ledger-writer") -> None:
        self._connect = connect
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failed: BaseException | None = None
        self.batches = 0  # commits made, for tests and curiosity
        self.jobs = 0

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()
        await self.run(lambda conn: None)  # surfaces a connection error here, not later

    def submit(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Queue `fn(conn)`; the future gets its result once its transaction is committed. The
        job runs whatever becomes of the future: cancelling it only drops the result."""
        assert self._loop is not None, "writer not started"
        future: asyncio.Future[T] = self._loop.create_future()
        if self._failed is not None:
            future.set_exception(self._failed)
        else:
            self._queue.put(_Job(fn, future))
        return future

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self.submit(fn)

    async def stop(self) -> None:
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join)

    def _run(self) -> None:
        try:
            conn = self._connect()
        except Exception as exc:
            self._failed = exc
            self._fail_all(exc)
            return
        try:
            while (job := self._queue.get()) is not None:
                batch = [job]
                stop = False
                while len(batch) < MAX_BATCH:
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        stop = True
                        break
                    batch.append(more)
                self._commit(conn, batch)
                if stop:
                    break
        finally:
            conn.close()

    def _commit(self, conn: sqlite3.Connection, batch: list[_Job]) -> None:
        outcomes: list[tuple[_Job, Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for job in batch:
                conn.execute("SAVEPOINT job")
                try:
                    result = job.fn(conn)
                except Exception as exc:
                    conn.execute("ROLLBACK TO job")
                    outcomes.append((job, None, exc))
                else:
                    outcomes.append((job, result, None))
                conn.execute("RELEASE job")
            conn.execute("COMMIT")
        except Exception as exc:  # BEGIN or COMMIT failed (disk full, I/O error): nothing was stored
            log.error("ledger_commit_failed jobs=%d error=%s", len(batch), exc)
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            outcomes = [(job, None, exc) for job in batch]
        self.batches += 1
        self.jobs += len(batch)
        assert self._loop is not None
        self._loop.call_soon_threadsafe(_deliver, outcomes)

    def _fail_all(self, error: BaseException) -> None:
        assert self._loop is not None
        pending: list[tuple[_Job, Any, BaseException | None]] = []
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                pending.append((job, None, error))
        self._loop.call_soon_threadsafe(_deliver, pending)
