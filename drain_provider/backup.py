"""`python -m drain_provider backup`: a copy of the ledger, safe to take while the server runs.

SQLite's online backup API copies the database in one step (`Connection.backup` with every page
at once), inside one read transaction: the copy is the ledger as of one commit, whatever the
server writes meanwhile (in WAL mode readers and the writer do not block each other). Every
voucher committed before the backup started is in it. The copy is a plain database (journal mode
DELETE, no -wal file beside it), created 0600, never over an existing file, and checked with
`PRAGMA integrity_check` before it is reported.

Restoring: stop the server, copy the backup over DATABASE_PATH (and delete the old -wal and -shm
files beside it), start the server. Vouchers accepted after the backup are lost with a restore:
the chain still pays what was claimed, and the claimer reads each channel's claimed amount back
from the chain.
"""

from __future__ import annotations

import datetime
import os
import sqlite3
import sys
from pathlib import Path
from urllib.parse import quote


class BackupError(Exception):
    """Why there is no backup; `code` is the exit code (2: a bad argument or setting)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def default_target(database: Path, now: datetime.datetime | None = None) -> Path:
    """backup-<UTC time>.db beside the ledger (on its volume, with its permissions)."""
    stamp = (now or datetime.datetime.now(datetime.UTC)).strftime("%Y%m%dT%H%M%SZ")
    return database.parent / f"backup-{stamp}.db"


def _open_source(database: Path) -> sqlite3.Connection:
    """The ledger, opened without creating it: a backup of a mistyped path is an error, not an
    empty database."""
    if not database.is_file():
        raise BackupError("DATABASE_PATH: no ledger there (nothing to back up)", 2)
    try:
        conn = sqlite3.connect(f"file:{quote(str(database.resolve()))}?mode=rw", uri=True, isolation_level=None)
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
    except sqlite3.Error as exc:
        raise BackupError(f"DATABASE_PATH: cannot be read as SQLite ({exc})", 2) from None
    return conn


def _create_target(target: Path) -> None:
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        raise BackupError("--out: the file exists; backup replaces nothing", 2) from None
    except OSError as exc:
        raise BackupError(f"--out: cannot create it ({type(exc).__name__})", 2) from None


def row_counts(conn: sqlite3.Connection) -> dict[str, int]:
    tables = [
        name
        for (name,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name"
        )
    ]
    return {name: int(conn.execute(f'SELECT COUNT(*) FROM "{name}"').fetchone()[0]) for name in tables}


def backup(database: Path, target: Path) -> dict[str, int]:
    """Copy the ledger to `target` (a new file, 0600) and check the copy; its row counts."""
    source = _open_source(database)
    try:
        _create_target(target)
        copy = sqlite3.connect(target, isolation_level=None)
        try:
            source.backup(copy)  # pages=-1: all at once, one consistent snapshot
            copy.execute("PRAGMA journal_mode = DELETE")  # one self-contained file
            verdict = copy.execute("PRAGMA integrity_check").fetchall()
            if verdict != [("ok",)]:
                raise BackupError(f"the copy fails its integrity check ({verdict[0][0]}); removed")
            return row_counts(copy)
        except BaseException:
            copy.close()
            target.unlink(missing_ok=True)
            raise
        finally:
            copy.close()
    except sqlite3.Error as exc:
        target.unlink(missing_ok=True)
        raise BackupError(f"the backup failed ({exc})") from None
    finally:
        source.close()


def run_backup(database: Path, out: Path | None) -> int:
    """The command: one line saying where, how big, and what is in it."""
    target = out if out is not None else default_target(database)
    counts = backup(database, target)
    size = target.stat().st_size
    rows = ", ".join(f"{table} {count}" for table, count in counts.items())
    print(f"backup {target}: {size} bytes, integrity ok; rows: {rows}")
    restore = f"restore: stop the server, copy {target} over {database} (delete its -wal and -shm), start it"
    print(restore, file=sys.stderr)
    return 0
