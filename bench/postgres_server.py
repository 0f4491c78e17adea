"""A real PostgreSQL server for the tests and the benchmarks: a throwaway cluster on loopback, one
per test process, and a fresh database per test (`CREATE DATABASE`, fsync off: about 20 ms).

It runs the server binaries found on PATH or in Debian's /usr/lib/postgresql/<version>/bin
(.ci/run installs them). PostgreSQL refuses to run as root: as root, the cluster belongs to the
`postgres` user (made by Debian's package) and is started with runuser. DRAIN_TEST_DATABASE_URL
(a URL whose user may CREATE DATABASE) uses a server of your own instead.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

MISSING = (
    "the PostgreSQL tests need the PostgreSQL server binaries (initdb, pg_ctl): install them "
    "(Debian/Ubuntu: apt-get install postgresql) or set DRAIN_TEST_DATABASE_URL to a server of yours"
)


def find_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PostgresServer:
    """A server this test process may create databases on: `admin_url` names its `postgres`
    database, as a user that may CREATE DATABASE."""

    admin_url: str
    _stop: list[str] | None = None
    data: Path | None = None  # the cluster's directory, when it was started here
    _names = itertools.count(1)

    def url_for(self, database: str) -> str:
        parts = urlsplit(self.admin_url)
        return urlunsplit(parts._replace(path="/" + database))

    async def create_database(self) -> str:
        """A new empty database; its URL."""
        name = f"drain_test_{os.getpid()}_{next(self._names)}"
        conn = await asyncpg.connect(self.admin_url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        finally:
            await conn.close()
        return self.url_for(name)

    async def drop_database(self, url: str) -> None:
        name = urlsplit(url).path.lstrip("/")
        conn = await asyncpg.connect(self.admin_url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    def stop(self) -> None:
        if self._stop:
            subprocess.run(self._stop, capture_output=True, timeout=30, check=False)


def _as_owner(owner: str | None, argv: list[str]) -> list[str]:
    return ["runuser", "-u", owner, "--", *argv] if owner else argv


@contextlib.contextmanager
def running_server(*, durable: bool = False) -> Iterator[PostgresServer]:
    """The server for this test process: DRAIN_TEST_DATABASE_URL's, or a cluster started here
    (and stopped at the end). Tests run it with fsync off; `durable` keeps PostgreSQL's defaults
    (every commit flushed), as a benchmark beside SQLite's synchronous=FULL must."""
    given = os.environ.get("DRAIN_TEST_DATABASE_URL")
    if given:
        yield PostgresServer(given)
        return
    initdb, pg_ctl = find_binary("initdb"), find_binary("pg_ctl")
    if not initdb or not pg_ctl:
        raise RuntimeError(MISSING)
    owner = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres").pw_name
        except KeyError:
            raise RuntimeError(MISSING + " (as root, a `postgres` user to run the server as)") from None
    home = Path(tempfile.mkdtemp(prefix="drain-pg-"))
    if owner:
        shutil.chown(home, user=owner)
    data, port = home / "data", _free_port()
    subprocess.run(
        _as_owner(owner, [initdb, "-D", str(data), "-A", "trust", "-U", "drain", "--no-sync", "-E", "UTF8"]),
        check=True,
        capture_output=True,
        timeout=120,
    )
    options = f"-p {port} -k {home} -c listen_addresses=127.0.0.1 -c max_connections=300"
    if not durable:
        options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    subprocess.run(
        _as_owner(owner, [pg_ctl, "-D", str(data), "-o", options, "-l", str(home / "log"), "-w", "start"]),
        check=True,
        capture_output=True,
        timeout=120,
    )
    server = PostgresServer(
        f"postgresql://drain@127.0.0.1:{port}/postgres",
        _stop=_as_owner(owner, [pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"]),
        data=data,
    )
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(home, ignore_errors=True)
