"""Does a paid request cost the same with a big ledger? CPU per paid request (concurrency 32)
with 10k, 100k and 1M voucher rows and as many usage rows already in the ledger.

The rows are written straight into a fresh ledger file (about a thousand past channels), then
a provider is started on it and the same load is run against each size, in rounds.
"""

from __future__ import annotations

import asyncio
import sqlite3
import statistics
import time
from pathlib import Path
from typing import Any

from drain_provider.ledger import SQLiteLedger

from .harness import Rig
from .overhead import load


def _fill(path: Path, rows: int) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("BEGIN")
    channels = max(rows // 1000, 1)
    now = time.time()
    conn.executemany(
        """INSERT INTO channels (channel_id, consumer, provider, deposit, claimed, expiry, status, charged,
                                 last_amount, last_nonce, synced_at, created_at)
           VALUES (?, ?, ?, 100000000, 0, 4000000000, 'open', ?, ?, '1000', ?, ?)""",
        (
            ("0x%064x" % (c + 1), "0x" + "11" * 20, "0x" + "22" * 20, 50_000, 1_000_000, now, now)
            for c in range(channels)
        ),
    )
    signature = "0x" + "ab" * 65
    conn.executemany(
        "INSERT INTO vouchers (channel_id, amount, nonce, signature, received_at) VALUES (?, ?, ?, ?, ?)",
        (("0x%064x" % (i % channels + 1), 1000 * (i // channels + 1), str(i // channels + 1), signature, now)
         for i in range(rows)),
    )  # fmt: skip
    conn.executemany(
        """INSERT INTO usage (channel_id, voucher_id, endpoint, model, status, reserved, input_tokens, output_tokens,
                              usage_source, price_cost, cost, started_at, finished_at)
           VALUES (?, ?, '/chat/completions', 'demo', 'ok', 100, 20, 30, 'upstream', 80, 80, ?, ?)""",
        (("0x%064x" % (i % channels + 1), i + 1, now, now) for i in range(rows)),
    )
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


async def populated_ledger(path: Path, rows: int) -> None:
    ledger = SQLiteLedger(path)  # creates the schema through the real migrations
    await ledger.open()
    await ledger.close()
    await asyncio.to_thread(_fill, path, rows)


async def run(rig: Rig, *, quick: bool) -> dict[str, Any]:
    """The sizes take turns over the rounds (a provider restarted on each ledger every time), so
    the machine's drift does not pass for a trend; each size's median round is reported."""
    sizes = [10_000, 100_000] if quick else [10_000, 100_000, 1_000_000]
    rounds = 1 if quick else 3
    paths = {rows: rig.workdir / f"ledger-{rows}.db" for rows in sizes}
    for rows, path in paths.items():
        await populated_ledger(path, rows)
    runs: dict[int, list[tuple[float, float]]] = {rows: [] for rows in sizes}
    for _ in range(rounds):
        for rows, path in paths.items():
            rig.restart_provider(DATABASE_PATH=str(path))
            await load(rig, rig.provider, concurrency=32, per_lane=2, paid=True)  # warm-up: channels from chain
            run_ = await load(rig, rig.provider, concurrency=32, per_lane=10 if quick else 20, paid=True)
            count = len(run_["latencies"])
            runs[rows].append((run_["cpu"] / count * 1e6, count / run_["wall"]))
    result: dict[str, Any] = {
        str(rows): {
            "server_cpu_us_per_request": statistics.median(cpu for cpu, _ in done),
            "requests_per_s": statistics.median(rps for _, rps in done),
            "rounds": len(done),
            "file_mb": paths[rows].stat().st_size / 1e6,
        }
        for rows, done in runs.items()
    }
    cpus = [result[str(rows)]["server_cpu_us_per_request"] for rows in sizes]
    result["largest_vs_smallest"] = cpus[-1] / cpus[0]
    return result
