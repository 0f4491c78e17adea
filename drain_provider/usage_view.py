"""The usage ledger for the operator: GET /v1/admin/usage and `python -m drain_provider usage`.

One parser of the filters (query parameters and command-line options are the same words), one
JSON shape per row, and the CLI's read: on SQLite a read-only connection of its own, so it works
while the server runs (WAL readers never block the writer) and can never change the ledger; on
PostgreSQL (DATABASE_URL) the ledger's own `usage_page`, as the admin endpoint reads it.
Rows come newest first; a page's `nextBefore` is the `before` of the next one.
"""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .ledger import INT64_MAX, UsageFilter, UsageRecord, usage_query

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
MAX_MODEL_CHARS = 200
_DIGITS = re.compile(r"[0-9]{1,19}")
_CHANNEL = re.compile(r"0x[0-9a-fA-F]{64}")
FILTERS = ("channel", "model", "since", "until", "before", "limit")


class UsageQueryError(ValueError):
    """A filter that does not parse; the message says which and how, and quotes nothing sent."""


def whole_param(params: Mapping[str, str], name: str, *, minimum: int, maximum: int) -> int | None:
    """A whole-number query parameter (or CLI option) within bounds, None when absent; the
    channel endpoints' paging reads theirs with it too."""
    raw = params.get(name)
    if raw is None:
        return None
    if not _DIGITS.fullmatch(raw) or not minimum <= int(raw) <= maximum:
        raise UsageQueryError(f"{name} must be a whole number from {minimum} to {maximum}.")
    return int(raw)


def parse_filter(params: Mapping[str, str]) -> UsageFilter:
    """The filter of `params` (query parameters, or the CLI's options by the same names)."""
    unknown = sorted(set(params) - set(FILTERS))
    if unknown:
        raise UsageQueryError(f"unknown parameter; the filters are {', '.join(FILTERS)}.")
    channel = params.get("channel")
    if channel is not None and not _CHANNEL.fullmatch(channel):
        raise UsageQueryError("channel must be a channel id: 0x and 64 hex digits.")
    model = params.get("model")
    if model is not None and not 0 < len(model) <= MAX_MODEL_CHARS:
        raise UsageQueryError(f"model must be a model name of 1 to {MAX_MODEL_CHARS} characters.")
    since = whole_param(params, "since", minimum=0, maximum=INT64_MAX)
    until = whole_param(params, "until", minimum=0, maximum=INT64_MAX)
    if since is not None and until is not None and until <= since:
        raise UsageQueryError("until must be after since (unix seconds).")
    limit = whole_param(params, "limit", minimum=1, maximum=MAX_LIMIT)
    return UsageFilter(
        limit=DEFAULT_LIMIT if limit is None else limit,
        before=whole_param(params, "before", minimum=1, maximum=INT64_MAX),
        channel=None if channel is None else channel.lower(),
        model=model,
        since=since,
        until=until,
    )


def row_json(row: UsageRecord) -> dict[str, Any]:
    """One paid request: ids, times (unix seconds), tokens, and amounts in base units as strings."""
    return {
        "id": row.id,
        "requestId": row.request_id,
        "startedAt": row.started_at,
        "finishedAt": row.finished_at,
        "channelId": row.channel_id,
        "endpoint": row.endpoint,
        "model": row.model,
        "status": row.status,
        "inputTokens": row.input_tokens,
        "outputTokens": row.output_tokens,
        "reserved": str(row.reserved),
        "cost": str(row.cost),
        "priceCost": str(row.price_cost),
    }


def page_json(rows: Sequence[UsageRecord], wanted: UsageFilter) -> dict[str, Any]:
    """A page of `wanted.limit` rows, from `limit + 1` read: `nextBefore` when there are more."""
    shown = rows[: wanted.limit]
    more = len(rows) > wanted.limit
    return {"items": [row_json(row) for row in shown], "nextBefore": shown[-1].id if more else None}


# --- the command line -------------------------------------------------------------------------

_COLUMNS = ("id", "started (UTC)", "channel", "model", "endpoint", "status", "in", "out", "cost", "request id")


def _table(rows: Sequence[UsageRecord]) -> str:
    lines = [
        (
            str(row.id),
            time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(row.started_at)),
            row.channel_id[:10] + "…",
            row.model,
            row.endpoint,
            row.status,
            str(row.input_tokens),
            str(row.output_tokens),
            str(row.cost),
            row.request_id or "-",
        )
        for row in rows
    ]
    widths = [max(len(cell) for cell in column) for column in zip(_COLUMNS, *lines, strict=False)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in (_COLUMNS, *lines)
    )


def read_usage(path: Path, wanted: UsageFilter) -> list[UsageRecord]:
    """The rows `wanted` asks for, from the ledger file read-only (raises sqlite3.Error)."""
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA busy_timeout = 5000")
        columns = {row["name"] for row in conn.execute("PRAGMA table_info(usage)")}
        sql, params = usage_query(wanted, with_request_id="request_id" in columns)
        return [UsageRecord.from_row(row) for row in conn.execute(sql, params)]
    finally:
        conn.close()


async def read_usage_at(url: str, wanted: UsageFilter) -> list[UsageRecord]:
    """The rows `wanted` asks for, from the PostgreSQL ledger at `url` (raises ENGINE_ERRORS)."""
    from .checks import LEDGER_CONNECT_TIMEOUT
    from .ledger import PostgresLedger

    ledger = PostgresLedger(url)
    try:
        await asyncio.wait_for(ledger.open(), LEDGER_CONNECT_TIMEOUT)
        return await ledger.usage_page(wanted)
    finally:
        await ledger.close()


def run_usage(path: Path, params: Mapping[str, str], *, as_json: bool, url: str | None = None) -> int:
    """`usage`: a table, or one JSON object per line; exit 2 with one line on a bad filter or a
    ledger that cannot be read (`url`: DATABASE_URL, else the SQLite file at `path`)."""
    try:
        wanted = parse_filter(params)
    except UsageQueryError as exc:
        print(f"drain-provider: usage: {exc}", file=sys.stderr)
        return 2
    if url:
        from .checks import postgres_problem
        from .ledger import ENGINE_ERRORS, shown_url

        try:
            rows = asyncio.run(read_usage_at(url, wanted))
        except ENGINE_ERRORS as exc:
            print(f"drain-provider: usage: DATABASE_URL: {shown_url(url)} {postgres_problem(exc)}", file=sys.stderr)
            return 2
    elif not path.is_file():
        print(f"drain-provider: usage: no ledger at DATABASE_PATH={path}", file=sys.stderr)
        return 2
    else:
        try:
            rows = read_usage(path, wanted)
        except sqlite3.Error as exc:
            print(f"drain-provider: usage: the ledger at DATABASE_PATH={path} cannot be read ({exc})", file=sys.stderr)
            return 2
    if as_json:
        for row in rows:
            print(json.dumps(row_json(row)))
    else:
        print(_table(rows))
    return 0
