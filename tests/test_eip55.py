"""Every address we print is EIP-55 (viem refuses one with a bad checksum): every 0x + 40 hex in
what the provider serves (/health, /v1/signing, /v1/pricing, /v1/docs, a 402's discovery
headers, paid answers, the admin reports), in its log lines, in what `status`, `doctor` and `dev`
print (and data/dev.json), and in a ledger mismatch's message, goes through eth-utils' checksum
check. Twice: on a replica of Amoy (an anvil node with chain id 80002 and our contracts at the
real Amoy addresses, a provider configured by CHAIN_ID=80002 alone), and on the test chains."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from eth_account import Account
from eth_utils.address import is_checksum_address, to_checksum_address
from helpers import DEMO_PRICE, USDC, ChannelFactory, Provider, ProviderFactory, Upstream
from pytest_aiohttp import AiohttpServer

from drain_provider.api import create_app
from drain_provider.checks import inspect_ledger, open_ledger
from drain_provider.config import ConfigError, load_settings
from drain_provider.consumer import DrainConsumer
from drain_provider.devtools.demo_upstream import DEMO_MODEL
from drain_provider.devtools.devchain import DevChain
from drain_provider.protocol import DEPLOYMENTS, ContractRef

AMOY = DEPLOYMENTS[80002]
ADMIN_TOKEN = "an-admin-token-for-the-eip55-test"
# 0x + exactly 40 hex digits: not a 64-hex channel id or hash, not a 130-hex signature.
HEX_ADDRESS = re.compile(r"(?<![0-9A-Za-z])0x[0-9a-fA-F]{40}(?![0-9a-fA-F])")


def addresses_in(text: str) -> set[str]:
    return set(HEX_ADDRESS.findall(text))


def assert_eip55(text: str, *expected: str) -> None:
    """Every address in `text` is checksummed, and the ones expected are there (so that an
    output that stopped showing them does not pass by showing nothing)."""
    found = addresses_in(text)
    bad = sorted(a for a in found if not is_checksum_address(a))
    assert not bad, f"addresses not in EIP-55: {bad}"
    assert set(expected) <= found, sorted(set(expected) - found)


# --- a replica of Amoy: the `amoy` and `amoy_url` fixtures of conftest.py ---------------------


def amoy_env(amoy_url: str, key: bytes, upstream_url: str, database: Path) -> dict[str, str]:
    """A provider on Amoy as an operator configures it: the chain id, nothing about contracts."""
    return {
        "PROVIDER_PRIVATE_KEY": "0x" + key.hex(),
        "CHAIN_ID": "80002",
        "RPC_URL": amoy_url,
        "UPSTREAM_BASE_URL": upstream_url,
        "DATABASE_PATH": str(database),
        "HOST": "127.0.0.1",
        "CLAIM_INTERVAL": "0",
        "ADMIN_TOKEN": ADMIN_TOKEN,
    }


# --- what the provider serves and logs ---------------------------------------------------------


async def served_text(session: aiohttp.ClientSession, server: TestServer, consumer: DrainConsumer) -> str:
    """Everything a client and the operator read over HTTP, as one text: bodies and headers."""
    out: list[str] = []

    async def take(method: str, path: str, **kwargs: Any) -> aiohttp.ClientResponse:
        async with session.request(method, server.make_url(path), **kwargs) as resp:
            out.extend([await resp.text(), json.dumps(dict(resp.headers))])
            return resp

    for path in ("/health", "/v1/signing", "/v1/pricing", "/v1/docs", "/v1/models"):
        assert (await take("GET", path)).status == 200, path
    body = {"model": DEMO_MODEL, "messages": [{"role": "user", "content": "checksums?"}], "max_tokens": 20}
    assert (await take("POST", "/v1/chat/completions", json=body)).status == 402
    for stream in (False, True):
        voucher = consumer.next_voucher(100_000)
        resp = await take(
            "POST",
            "/v1/chat/completions",
            json={**body, "stream": stream},
            headers={"X-DRAIN-Voucher": voucher.header_value()},
        )
        assert resp.status == 200
        consumer.record(resp.headers)
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    assert (await take("POST", "/v1/admin/claim?force=true", headers=admin)).status == 200
    for path in ("/v1/admin/stats", "/v1/admin/channels", "/v1/admin/vouchers", "/v1/admin/claims"):
        assert (await take("GET", path, headers=admin)).status == 200, path
    return "\n".join(out)


def log_text(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(record.getMessage() for record in caplog.records)


async def test_what_a_provider_on_amoy_serves_and_logs(
    amoy: DevChain, amoy_url: str, upstream: Upstream, aiohttp_server: AiohttpServer, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.INFO, logger="drain_provider")
    key = bytes(Account.create().key)
    settings = load_settings(amoy_env(amoy_url, key, upstream.url, tmp_path / "amoy.db"))
    assert [ref.address for ref in settings.contracts] == [AMOY.v2, AMOY.v1]
    settings = replace(settings, prices={DEMO_MODEL: DEMO_PRICE})
    await amoy.fund(settings.provider_address)
    server = await aiohttp_server(create_app(settings))  # over JSON-RPC, as `serve` does
    consumer_key = bytes(Account.create().key)
    await amoy.fund(Account.from_key(consumer_key).address, usdc=10 * USDC)
    consumer = await DrainConsumer.open_channel(
        amoy.w3, AMOY.v2, consumer_key, settings.provider_address, deposit=10 * USDC, token=AMOY.usdc
    )
    async with aiohttp.ClientSession() as session:
        text = await served_text(session, server, consumer)
    assert_eip55(text, settings.provider_address, AMOY.v2, AMOY.v1, AMOY.usdc, consumer.address)
    assert '"status": "confirmed"' in text  # the replica paid a claim: it is Amoy's contract in all but name
    assert_eip55(log_text(caplog))

    # A ledger of another contract: what `serve` and `doctor` say names both.
    elsewhere = to_checksum_address("0x" + "ab" * 20)
    other = replace(settings, drain_contract=elsewhere, contracts=(ContractRef(elsewhere, "v2"),))
    with pytest.raises(ConfigError) as refused:
        await open_ledger(other)
    assert_eip55(str(refused.value), AMOY.v2, other.drain_contract)
    assert_eip55(inspect_ledger(other).detail, AMOY.v2)


async def test_what_a_provider_on_the_test_chain_serves_and_logs(
    provider_factory: ProviderFactory, open_channel: ChannelFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="drain_provider")
    # No gas: /health and the log lines name the account to fund, and the claim is held back.
    provider: Provider = await provider_factory(admin_token=ADMIN_TOKEN, fund=False)
    consumer = await open_channel(provider)
    async with aiohttp.ClientSession() as session:
        text = await served_text(session, provider.server, consumer)
    assert "insufficient_gas_funds" in text
    assert_eip55(text, provider.address, provider.settings.drain_contract, consumer.address)
    assert_eip55(log_text(caplog), provider.address)


# --- what the commands print -------------------------------------------------------------------


async def run(*args: str, env: dict[str, str], cwd: Path) -> str:
    """`python -m drain_provider ARGS`: its stdout and stderr (log lines) together."""
    base = {k: os.environ[k] for k in ("PATH", "LANG", "PYTHONPATH", "SYSTEMROOT") if k in os.environ}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "drain_provider", *args, env={**base, **env}, cwd=cwd,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode in (0, 1), (args, out.decode(), err.decode())  # doctor: 1 when a check fails
    return out.decode() + err.decode()


async def test_what_the_commands_print(
    amoy: DevChain, amoy_url: str, anvil_chain: DevChain, upstream: Upstream, tmp_path: Path
) -> None:
    key = bytes(Account.create().key)
    provider = Account.from_key(key).address
    await amoy.fund(provider)
    await anvil_chain.fund(provider)
    on_amoy = {**amoy_env(amoy_url, key, upstream.url, tmp_path / "amoy.db"), "LOG_LEVEL": "INFO"}
    on_test_chain = {
        **on_amoy,
        "CHAIN_ID": str(anvil_chain.chain_id),
        "RPC_URL": str(anvil_chain.rpc_url),
        "DRAIN_CONTRACT": anvil_chain.contract,
        "DATABASE_PATH": str(tmp_path / "test.db"),
    }
    amoy_status, test_status, amoy_doctor, test_doctor = await asyncio.gather(
        run("status", env=on_amoy, cwd=tmp_path),
        run("status", env=on_test_chain, cwd=tmp_path),
        run("doctor", env=on_amoy, cwd=tmp_path),
        run("doctor", env=on_test_chain, cwd=tmp_path),
    )
    assert_eip55(amoy_status, provider, AMOY.v2)
    assert_eip55(amoy_doctor, provider, AMOY.v2)
    assert_eip55(test_status, provider, anvil_chain.contract)
    assert_eip55(test_doctor, provider, anvil_chain.contract)


async def test_what_dev_prints_and_writes(amoy_url: str, tmp_path: Path) -> None:
    """dev's banner, its log lines and data/dev.json, on a node with Amoy's chain id."""
    dev = await run("dev", "--rpc-url", amoy_url, "--no-serve", env={"LOG_LEVEL": "INFO"}, cwd=tmp_path)
    facts = json.loads((tmp_path / "data" / "dev.json").read_text())
    assert facts["chainId"] == 80002
    assert_eip55(dev, facts["contract"], facts["token"], facts["provider"], facts["consumer"]["address"])
    assert_eip55(json.dumps(facts), facts["contract"], facts["token"], facts["provider"])
