"""GET /v1/admin/usage and `python -m drain_provider usage`: the usage ledger, paged and filtered,
and refused with a clear 400 (or exit 2) when a filter does not parse."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers import ChannelFactory, Provider, ProviderFactory, paid_chat

from drain_provider.devtools.demo_upstream import DEMO_MODEL

TOKEN = "admin-0123456789abcdef-secret"


async def usage(provider: Provider, **params: Any) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{provider.url}/admin/usage", params=params, headers=headers) as resp,
    ):
        return resp.status, await resp.json()


@pytest.fixture
async def served(provider_factory: ProviderFactory, open_channel: ChannelFactory) -> tuple[Provider, list[str]]:
    """Three paid requests on two channels, the last one on gpt-4o; the channels."""
    provider = await provider_factory(admin_token=TOKEN)
    first, second = await open_channel(provider), await open_channel(provider)
    await paid_chat(provider.client(), first)
    await paid_chat(provider.client(), second)
    await paid_chat(provider.client(), first, model="gpt-4o", budget=10**6)
    return provider, [first.channel_id, second.channel_id]


async def test_pages_newest_first_with_filters(served: tuple[Provider, list[str]]) -> None:
    provider, (first, second) = served
    status, page = await usage(provider, limit=2)
    assert status == 200
    rows = await provider.ledger.fetchall("SELECT id, channel_id, model, cost, request_id FROM usage ORDER BY id DESC")
    assert [item["id"] for item in page["items"]] == [rows[0][0], rows[1][0]]
    assert page["nextBefore"] == rows[1][0]
    item = page["items"][0]
    assert (item["channelId"], item["model"], item["cost"], item["requestId"]) == (
        first,
        "gpt-4o",
        str(rows[0][3]),
        rows[0][4],
    )
    assert item["requestId"] and item["status"] == "ok" and item["endpoint"] == "/chat/completions"
    status, rest = await usage(provider, limit=2, before=page["nextBefore"])
    assert [item["id"] for item in rest["items"]] == [rows[2][0]] and rest["nextBefore"] is None
    assert [i["channelId"] for i in (await usage(provider, channel=second))[1]["items"]] == [second]
    assert [i["model"] for i in (await usage(provider, model=DEMO_MODEL))[1]["items"]] == [DEMO_MODEL] * 2
    now = int(time.time())
    assert len((await usage(provider, since=now - 600, until=now + 600))[1]["items"]) == 3
    assert (await usage(provider, since=now + 600))[1]["items"] == []


@pytest.mark.parametrize(
    "params",
    [
        {"limit": "0"},
        {"limit": "1001"},
        {"limit": "ten"},
        {"before": "-1"},
        {"since": "1.5"},
        {"since": "10", "until": "5"},
        {"channel": "0x1234"},
        {"model": "m" * 201},
        {"colour": "blue"},
        {"limit": "9" * 30},
    ],
)
async def test_bad_filters_are_400(served: tuple[Provider, list[str]], params: dict[str, str]) -> None:
    status, body = await usage(served[0], **params)
    assert (status, body["error"]["code"]) == (400, "invalid_request")


def run_cli(database: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "drain_provider", "usage", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=database.parent,  # no .env there
        env={"PATH": "/usr/bin:/bin", "DATABASE_PATH": str(database), "PYTHONPATH": str(Path(__file__).parents[1])},
    )


async def test_the_cli_reads_the_ledger_while_the_server_runs(served: tuple[Provider, list[str]]) -> None:
    provider, (first, _) = served
    database = provider.settings.database_path
    done = run_cli(database, "--json", "--channel", first)
    assert done.returncode == 0, done.stderr
    items = [json.loads(line) for line in done.stdout.splitlines()]
    assert [i["model"] for i in items] == ["gpt-4o", DEMO_MODEL]
    assert {i["channelId"] for i in items} == {first}
    table = run_cli(database, "--limit", "2")
    assert table.returncode == 0, table.stderr
    header, *lines = table.stdout.splitlines()
    assert header.split()[:2] == ["id", "started"] and len(lines) == 2
    status, page = await usage(provider)  # the server was not disturbed
    assert status == 200 and len(page["items"]) == 3


@pytest.mark.parametrize("args", [("--limit", "0"), ("--since", "yesterday"), ("--nope",), ("--channel", "0x1")])
def test_the_cli_refuses_bad_arguments_in_one_line(tmp_path: Path, args: tuple[str, ...]) -> None:
    done = run_cli(tmp_path / "ledger.db", *args)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("drain-provider: ")
    assert "Traceback" not in done.stderr
