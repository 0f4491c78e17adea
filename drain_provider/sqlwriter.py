"""One writer thread for SQLite, with group commit.

Every write to the ledger is a plain function of a sqlite3 connection, run on a single thread
that owns the only write connection (Datasette's `execute_write_fn`). What that thread adds is
group commit: the jobs submitted during one turn of the event loop reach it together, with any
still waiting from earlier turns, and run in one `BEGIN IMMEDIATE ... COMMIT`. Under load that is
one commit (one fsync with synchronous=FULL), one wake-up of the thread and one wake-up of the
event loop for a whole batch, instead of per request. Every caller still gets its result only
after the COMMIT that made its write durable.

A job may also ask to hear its outcome as soon as it has run, before the COMMIT
(`before_commit`): the ledger uses it to call the upstream while the voucher's transaction is
being made durable, and waits for the COMMIT only before the client is sent anything.

A job that raises is undone alone. The batch first runs without savepoints (they cost two
statements per job); if any job raises, the transaction is rolled back and the batch runs again
with a SAVEPOINT around each job. So a job must depend only on the connection and its own
arguments: it may run twice.
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

Outcome = tuple["_Job", Any, BaseException | None]


@dataclass
class _Job:
    fn: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]
    before_commit: asyncio.Future[Any] | None = None


def _resolve(future: asyncio.Future[Any] | None, result: Any, error: BaseException | None) -> None:
    if future is None or future.done():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


def _deliver_before_commit(outcomes: list[Outcome]) -> None:
    for job, result, error in outcomes:
        _resolve(job.before_commit, result, error)


def _deliver(outcomes: list[Outcome]) -> None:
    for job, result, error in outcomes:
        _resolve(job.before_commit, result, error)  # if it has not heard yet: BEGIN failed
        _resolve(job.future, result, error)


class _Failed(Exception):
    """A job raised in a batch run without savepoints: run the batch again with them."""


class Writer:
    def __init__(self, connect: Callable[[], sqlite3.Connection], *, name: str = "ledger-writer") -> None:
        self._connect = connect
        self._queue: queue.SimpleQueue[list[_Job] | None] = queue.SimpleQueue()
        self._pending: list[_Job] = []  # submitted during this turn of the event loop
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failed: BaseException | None = None
        self.batches = 0  # commits made, for tests and curiosity
        self.jobs = 0
        self.replays = 0  # batches run again with savepoints because a job raised

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()
        await self.run(lambda conn: None)  # surfaces a connection error here, not later

    def submit(
        self, fn: Callable[[sqlite3.Connection], T], *, before_commit: asyncio.Future[T] | None = None
    ) -> asyncio.Future[T]:
        """Queue `fn(conn)`; the future gets its result once its transaction is committed. The
        job runs whatever becomes of the future: cancelling it only drops the result.

        `before_commit`, if given, gets the outcome as soon as the job has run, before the
        COMMIT: a result there is not durable yet, and the returned future may still fail."""
        assert self._loop is not None, "writer not started"
        future: asyncio.Future[T] = self._loop.create_future()
        if self._failed is not None:
            _deliver([(_Job(fn, future, before_commit), None, self._failed)])
            return future
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(_Job(fn, future, before_commit))
        return future

    def _flush(self) -> None:
        jobs, self._pending = self._pending, []
        if self._failed is not None:
            _deliver([(job, None, self._failed) for job in jobs])
        elif jobs:
            self._queue.put(jobs)

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self.submit(fn)

    async def stop(self) -> None:
        self._flush()
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
            waiting: list[_Job] = []
            stop = False
            while not stop or waiting:
                if not waiting:
                    jobs = self._queue.get()
                    if jobs is None:
                        break
                    waiting = jobs
                while len(waiting) < MAX_BATCH and not stop:  # whatever else has arrived
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        stop = True
                    else:
                        waiting += more
                batch, waiting = waiting[:MAX_BATCH], waiting[MAX_BATCH:]
                self._commit(conn, batch)
        finally:
            conn.close()

    def _commit(self, conn: sqlite3.Connection, batch: list[_Job]) -> None:
        assert self._loop is not None
        try:
            try:
                outcomes = self._run_jobs(conn, batch, savepoints=False)
            except _Failed:
                self.replays += 1
                outcomes = self._run_jobs(conn, batch, savepoints=True)
            if any(job.before_commit is not None for job in batch):
                self._loop.call_soon_threadsafe(_deliver_before_commit, outcomes)
            conn.execute("COMMIT")
        except Exception as exc:  # BEGIN or COMMIT failed (disk full, I/O error): nothing was stored
            log.error("ledger_commit_failed jobs=%d error=%s", len(batch), exc)
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            outcomes = [(job, None, exc) for job in batch]
        self.batches += 1
        self.jobs += len(batch)
        self._loop.call_soon_threadsafe(_deliver, outcomes)

    @staticmethod
    def _run_jobs(conn: sqlite3.Connection, batch: list[_Job], *, savepoints: bool) -> list[Outcome]:
        """BEGIN and every job of the batch; the caller commits."""
        outcomes: list[Outcome] = []
        conn.execute("BEGIN IMMEDIATE")
        for job in batch:
            if savepoints:
                conn.execute("SAVEPOINT job")
            try:
                result = job.fn(conn)
            except Exception as exc:
                if not savepoints:
                    conn.execute("ROLLBACK")
                    raise _Failed from exc
                conn.execute("ROLLBACK TO job")
                outcomes.append((job, None, exc))
            else:
                outcomes.append((job, result, None))
            if savepoints:
                conn.execute("RELEASE job")
        return outcomes

    def _fail_all(self, error: BaseException) -> None:
        assert self._loop is not None
        pending: list[Outcome] = []
        while True:
            try:
                jobs = self._queue.get_nowait()
            except queue.Empty:
                break
            pending += [(job, None, error) for job in jobs or []]
        self._loop.call_soon_threadsafe(_deliver, pending)
