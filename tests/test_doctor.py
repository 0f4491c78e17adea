"""`python -m drain_provider doctor`, run as an operator runs it, against anvil and the demo
upstream: a table of checks, exit code 0 with nothing failed, 1 when a check fails (with how to
fix it), 2 for a configuration that does not load; never a secret, never more of a URL than its
scheme and host."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from eth_account import Account
from eth_utils.address import to_checksum_address
from helpers import Upstream

from drain_provider.checks import Result, check_upstream, inspect_ledger, open_ledger
from drain_provider.config import Settings
from drain_provider.devtools.devchain import DevChain
from drain_provider.upstream import Upstream as UpstreamClient

SECRET = "SECRET-0123456789abcdef"


async def doctor(env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    base = {k: os.environ[k] for k in ("PATH", "LANG", "PYTHONPATH", "SYSTEMROOT") if k in os.environ}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "drain_provider", "doctor", env={**base, **env}, cwd=cwd,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def rows(table: str) -> dict[str, str]:
    """check -> result, from the table's rows (columns are two or more spaces apart)."""
    return dict(re.findall(r"^([a-z][a-z ]*?) {2,}(ok|warn|fail) ", table, re.MULTILINE))


async def setup(anvil_chain: DevChain, upstream_url: str, tmp_path: Path) -> dict[str, str]:
    key = Account.create()
    await anvil_chain.fund(key.address)
    return {
        "PROVIDER_PRIVATE_KEY": "0x" + bytes(key.key).hex(),
        "OPENAI_API_KEY": "sk-" + SECRET,
        "CHAIN_ID": str(anvil_chain.chain_id),
        "RPC_URL": f"{anvil_chain.rpc_url}/?apikey={SECRET}",
        "DRAIN_CONTRACT": anvil_chain.contract,
        "UPSTREAM_BASE_URL": upstream_url,
        "DATABASE_PATH": str(tmp_path / "drain.db"),
    }


async def test_a_good_setup_passes(anvil_chain: DevChain, upstream: Upstream, tmp_path: Path) -> None:
    code, out, err = await doctor(await setup(anvil_chain, upstream.url, tmp_path), tmp_path)
    assert code == 0, out + err
    assert rows(out) == {
        "settings": "ok",
        "ledger": "ok",
        "rpc": "ok",
        "chain id": "ok",
        "contract": "ok",
        "gas": "ok",
        "upstream": "ok",
        "models": "warn",  # gpt-4o and friends are priced by default; the demo upstream lists "demo"
    }
    assert "does not exist yet" in out and not (tmp_path / "drain.db").exists()  # doctor creates nothing
    assert f"{anvil_chain.rpc_url} answers" in out
    assert SECRET not in out + err and err == ""


async def test_a_missing_contract_fails_with_how_to_fix_it(
    anvil_chain: DevChain, upstream: Upstream, tmp_path: Path
) -> None:
    env = await setup(anvil_chain, "http://127.0.0.1:9/v1", tmp_path)  # and no upstream
    env["DRAIN_CONTRACT"] = "0x" + "ab" * 20
    code, out, err = await doctor(env, tmp_path)
    assert code == 1, out + err
    found = rows(out)
    assert (found["contract"], found["upstream"]) == ("fail", "warn")
    assert "no contract at its address on chain 31337" in out
    assert "fix: set DRAIN_CONTRACT to the DrainChannel address on this chain" in out
    assert "gas" not in found  # not read: the contract is what to fix first
    assert SECRET not in out + err


async def test_a_configuration_that_does_not_load_is_one_line(tmp_path: Path) -> None:
    code, out, err = await doctor(
        {"PROVIDER_PRIVATE_KEY": "0x" + "11" * 32, "OPENAI_API_KEY": SECRET, "PORT": SECRET}, tmp_path
    )
    assert (code, out) == (2, "")
    (line,) = err.strip().splitlines()
    assert line.startswith("drain-provider: configuration error: PORT: ") and SECRET not in line


async def test_the_ledger_is_looked_at_not_opened(tmp_path: Path) -> None:
    """doctor reads the ledger's binding without a write: a ledger of another contract fails,
    with how to fix it, and is left as it was."""
    settings = Settings(
        provider_private_key=bytes(Account.create().key),
        chain_id=31337,
        drain_contract="0x" + "ab" * 20,
        contract_version="v2",
        rpc_url=None,
        database_path=tmp_path / "drain.db",
    )
    ledger = await open_ledger(settings)
    await ledger.close()
    before = settings.database_path.read_bytes()
    check = inspect_ledger(settings)
    assert (check.result, check.detail) == (Result.OK, f"{settings.database_path}: bound to this chain and contract")
    other = replace(settings, drain_contract="0x" + "cd" * 20, contracts=())
    check = inspect_ledger(other)
    bound = to_checksum_address("0x" + "ab" * 20)  # shown in EIP-55, as every address
    assert check.result is Result.FAIL and f"belongs to chain 31337 contract {bound}" in check.detail
    assert "DATABASE_PATH" in check.fix
    assert settings.database_path.read_bytes() == before


async def test_an_upstream_that_refuses_the_key_fails(aiohttp_server: Any) -> None:
    """Every paid request would fail: unlike an upstream that is down, this will not fix itself."""

    async def models(request: web.Request) -> web.Response:
        assert request.headers["Authorization"] == f"Bearer sk-{SECRET}"
        return web.json_response({"error": {"message": f"Incorrect API key provided: sk-{SECRET}"}}, status=401)

    app = web.Application()
    app.router.add_get("/v1/models", models)
    server = await aiohttp_server(app)
    async with aiohttp.ClientSession() as session:
        upstream = UpstreamClient(session, str(server.make_url("/v1")), f"sk-{SECRET}", timeout=5)
        (check,) = await check_upstream(upstream, ["gpt-4o"])
    assert (check.result, check.fix) == (Result.FAIL, "check OPENAI_API_KEY")
    assert check.detail.endswith("refuses the key (status 401)") and SECRET not in check.detail
    assert upstream.health.last_error == "status 401"
