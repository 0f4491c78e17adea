"""Files holding secrets are this user's alone: the ledger (vouchers worth money) and its WAL
files, and data/dev.json (the demo consumer's private key)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from eth_account import Account

from drain_provider.consumer import DrainConsumer
from drain_provider.devtools.dev import save_dev_consumer
from drain_provider.ledger import SQLiteLedger
from drain_provider.privatefile import write_private
from drain_provider.protocol import Domain


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


async def test_a_new_ledger_is_private_with_its_wal_files(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)  # the usual one, which gives 0644 files and 0755 directories
    try:
        ledger = SQLiteLedger(tmp_path / "ledger" / "drain.db")
        await ledger.open()
        await ledger.bind(chain_id=1, contract="0x" + "ab" * 20)  # a write: the WAL exists now
        try:
            assert mode(tmp_path / "ledger") == 0o700
            for name in ("drain.db", "drain.db-wal", "drain.db-shm"):
                assert mode(tmp_path / "ledger" / name) == 0o600, name
        finally:
            await ledger.close()
    finally:
        os.umask(old_umask)


async def test_an_existing_ledger_keeps_working_and_keeps_its_mode(tmp_path: Path) -> None:
    first = SQLiteLedger(tmp_path / "drain.db")
    await first.open()
    await first.bind(chain_id=1, contract="0x" + "ab" * 20)
    await first.close()
    os.chmod(tmp_path / "drain.db", 0o640)  # its owner's choice, say for a backup group
    again = SQLiteLedger(tmp_path / "drain.db")
    await again.open()
    try:
        await again.bind(chain_id=1, contract="0x" + "ab" * 20)
        assert await again.watched_block() is None
        assert mode(tmp_path / "drain.db") == 0o640
    finally:
        await again.close()


def test_dev_json_is_written_private_and_stays_so(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)
    try:
        path = tmp_path / "data" / "dev.json"
        facts = {"consumer": {"privateKey": "0x" + "22" * 32}, "lastNonce": "1", "lastAmount": "5"}
        write_private(path, json.dumps(facts))
        assert mode(path.parent) == 0o700 and mode(path) == 0o600
        os.chmod(path, 0o644)  # a copy from elsewhere, say: the next write replaces it privately

        consumer = DrainConsumer(Account.create(), Domain(1, "0x" + "ab" * 20), "0x" + "cd" * 32, 10, nonce=2, amount=9)
        save_dev_consumer(consumer, path)
        assert mode(path) == 0o600
        assert json.loads(path.read_text())["lastNonce"] == "2"
        assert [p.name for p in path.parent.iterdir()] == ["dev.json"]  # no temporary left behind
    finally:
        os.umask(old_umask)
