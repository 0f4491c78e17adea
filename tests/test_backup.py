"""`backup` while the provider serves: the copy is a whole, checked SQLite database holding every
voucher committed before it started, 0600, one file; it never replaces a file, and never makes
an empty ledger out of a mistyped DATABASE_PATH."""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
import stat
import sys
from pathlib import Path

from helpers import ChannelFactory, ProviderFactory, paid_chat


async def backup_command(cwd: Path, database: Path, *args: str) -> tuple[int, str, str]:
    base = {k: os.environ[k] for k in ("PATH", "LANG", "PYTHONPATH", "SYSTEMROOT") if k in os.environ}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "drain_provider", "backup", *args, env={**base, "DATABASE_PATH": str(database)},
        cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_backup_while_serving_paid_requests(
    provider_factory: ProviderFactory, open_channel: ChannelFactory, tmp_path: Path
) -> None:
    provider = await provider_factory()
    consumers = [await open_channel(provider) for _ in range(2)]
    clients = [provider.client() for _ in consumers]
    for consumer, client in zip(consumers, clients, strict=True):
        await paid_chat(client, consumer)
    serving = asyncio.Event()
    stop = asyncio.Event()

    async def load(index: int) -> int:
        done = 0
        while not stop.is_set():
            await paid_chat(clients[index], consumers[index])
            done += 1
            serving.set()
        return done

    loads = [asyncio.create_task(load(i)) for i in range(len(consumers))]
    await serving.wait()
    committed = {row for row in await provider.ledger.fetchall("SELECT id, channel_id, amount, nonce FROM vouchers")}
    target = tmp_path / "backups" / "ledger-copy.db"
    code, out, err = await backup_command(tmp_path, provider.settings.database_path, "--out", str(target))
    stop.set()
    during = sum(await asyncio.gather(*loads))
    assert code == 0, err
    assert during > 0  # requests were served while it ran

    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert not target.with_name(target.name + "-wal").is_file()  # one self-contained file
    copy = sqlite3.connect(f"file:{target}?mode=ro", uri=True)
    try:
        assert copy.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert copy.execute("PRAGMA journal_mode").fetchone() == ("delete",)
        kept = set(copy.execute("SELECT id, channel_id, amount, nonce FROM vouchers").fetchall())
        vouchers = len(kept)
        usage = copy.execute("SELECT COUNT(*) FROM usage").fetchone()[0]
    finally:
        copy.close()
    assert committed <= kept
    assert f"backup {target}: {target.stat().st_size} bytes, integrity ok" in out
    assert f"vouchers {vouchers}" in out and f"usage {usage}" in out

    # Never over a file, even a backup.
    before = target.read_bytes()
    code, out, err = await backup_command(tmp_path, provider.settings.database_path, "--out", str(target))
    assert code == 2 and err.strip() == "drain-provider: --out: the file exists; backup replaces nothing"
    assert target.read_bytes() == before


async def test_default_name_and_no_ledger(tmp_path: Path) -> None:
    missing = tmp_path / "data" / "drain.db"
    code, out, err = await backup_command(tmp_path, missing)
    assert code == 2 and err.strip() == "drain-provider: DATABASE_PATH: no ledger there (nothing to back up)"
    assert not missing.exists() and not missing.parent.exists()

    missing.parent.mkdir()
    sqlite3.connect(missing).execute("CREATE TABLE t (x)").connection.commit()
    code, out, err = await backup_command(tmp_path, missing)
    assert code == 0, err
    (made,) = missing.parent.glob("backup-*.db")
    assert re.fullmatch(r"backup-\d{8}T\d{6}Z\.db", made.name)
    assert out.startswith(f"backup {made}: ") and "rows: t 0" in out

    (tmp_path / "not-sqlite.db").write_text("this is not a database, and it is long enough to have a header" * 20)
    code, out, err = await backup_command(tmp_path, tmp_path / "not-sqlite.db", "--out", "x.db")
    assert code == 2 and err.startswith("drain-provider: DATABASE_PATH: cannot be read as SQLite")
    assert not (tmp_path / "x.db").exists()
