"""The process around the server: its event loop, and its end.

`python -m drain_provider` must end once it has stopped or failed to start, whatever a library
left running: a process that lingers after its last line is one a supervisor's `Restart=` never
restarts. Kept free of heavy imports, so that a start-up error is still printed within a second.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

# How long a stopped process waits for threads a library left running before it exits anyway.
THREAD_GRACE = 2.0


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` on uvloop where it is installed (the `fast` extra: the same asyncio, about a
    third less CPU per request), the standard loop otherwise.

    Unlike asyncio.run, the end does not wait for the worker threads of `asyncio.to_thread`:
    one stuck in a blocking call (a download without a timeout) must not keep a stopped process
    alive; `exit_watched` deals with what is left."""
    loop: asyncio.AbstractEventLoop
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    executor = ThreadPoolExecutor(thread_name_prefix="worker")
    loop.set_default_executor(executor)
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(main)
    finally:
        try:
            _cancel_leftover_tasks(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            executor.shutdown(wait=False, cancel_futures=True)
            asyncio.set_event_loop(None)
            loop.close()


def _cancel_leftover_tasks(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [task for task in asyncio.all_tasks(loop) if not task.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))


def exit_watched(code: int, grace: float = THREAD_GRACE) -> int:
    """Return `code` for the interpreter's own exit, watched: that exit waits for every
    non-daemon thread, and one that a library left blocked (an aiosqlite connection never
    closed, a download without a timeout) would keep the process alive for ever. If the process
    still exists `grace` seconds later, a daemon thread names the threads it waits for and ends
    it with `code` at once: a process that has stopped, or failed to start, must end, or a
    supervisor's restart never comes."""

    def watch() -> None:
        time.sleep(grace)
        waiting = [t.name for t in threading.enumerate() if not t.daemon and t is not threading.main_thread()]
        log.error("exit_forced code=%d threads=%s", code, ",".join(waiting) or "-")
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(code)

    threading.Thread(target=watch, name="exit-watchdog", daemon=True).start()
    return code
