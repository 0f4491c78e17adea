"""Claims over JSON-RPC against a real anvil node: end to end, through a flaky RPC, across a
killed process, and from the command line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from eth_utils.address import to_checksum_address
from helpers import ChannelFactory, ProviderFactory, RpcProxy, Upstream, free_port, paid_chat

from drain_provider.chain import ChainClient, ChainUnavailable
from drain_provider.devtools.devchain import DevChain

TOKEN = "admin-token-for-anvil-tests-0123"


async def tx_count(chain: DevChain, address: str) -> int:
    return int(await chain.w3.eth.get_transaction_count(to_checksum_address(address)))


async def test_pay_and_claim_end_to_end(
    anvil_chain: DevChain, provider_factory: ProviderFactory, open_channel: ChannelFactory
) -> None:
    provider = await provider_factory(
        chain_client=ChainClient.over_http(anvil_chain.rpc_url or "", anvil_chain.contract),
        on=anvil_chain,
        admin_token=TOKEN,
    )
    consumer = await open_channel(provider, on=anvil_chain)
    for _ in range(3):
        await paid_chat(provider.client(), consumer)
    contract_before = await anvil_chain.usdc_balance(anvil_chain.contract)
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{provider.url}/admin/claim?force=true", headers={"Authorization": f"Bearer {TOKEN}"}) as resp,
    ):
        result = await resp.json()
    (claim,) = result["claims"]
    assert claim["status"] == "confirmed" and claim["txHash"].startswith("0x")
    amount = int(claim["amount"])
    assert await anvil_chain.usdc_balance(provider.address) == amount
    assert await anvil_chain.usdc_balance(anvil_chain.contract) == contract_before - amount
    assert (await anvil_chain.client().get_channel(consumer.channel_id)).claimed == amount


@pytest.mark.parametrize(
    ("mode", "failures"), [("fail", 1), ("fail", 3), ("fail", 7), ("lose", 1), ("lose", 3), ("lose", 6)]
)
@pytest.mark.rule(6)
async def test_claim_lands_once_through_a_flaky_rpc(
    anvil_chain: DevChain,
    rpc_proxy: RpcProxy,
    provider_factory: ProviderFactory,
    open_channel: ChannelFactory,
    mode: str,
    failures: int,
) -> None:
    provider = await provider_factory(
        chain_client=ChainClient.over_http(rpc_proxy.url, anvil_chain.contract),
        on=anvil_chain,
        claim_threshold=1,
        claim_retry_seconds=0.01,
        claim_receipt_timeout=2.0,
    )
    consumer = await open_channel(provider, on=anvil_chain)
    await paid_chat(provider.client(), consumer)
    sent_before = await tx_count(anvil_chain, provider.address)
    setattr(rpc_proxy, f"{mode}_next", failures)
    for _ in range(60):
        with contextlib.suppress(ChainUnavailable):  # the cycle itself may hit an injected failure
            await provider.claimer.cycle()
        statuses = await provider.ledger.fetchall("SELECT status FROM claims ORDER BY id")
        if ("confirmed",) in statuses:
            break
        await asyncio.sleep(0.01)
    assert statuses[-1] == ("confirmed",) and statuses.count(("confirmed",)) == 1
    on_chain = await anvil_chain.client().get_channel(consumer.channel_id)
    assert on_chain.claimed > 0
    assert await anvil_chain.usdc_balance(provider.address) == on_chain.claimed
    assert await tx_count(anvil_chain, provider.address) == sent_before + 1  # one transaction, ever
    assert await provider.claimer.cycle() == []


async def _start_provider(env: dict[str, str], port: int) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "drain_provider", env=env, stdout=asyncio.subprocess.DEVNULL
    )
    for _ in range(300):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return proc
        except OSError:
            assert proc.returncode is None, "the provider exited"
            await asyncio.sleep(0.05)
    raise AssertionError("the provider did not start")


def _claims(database: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(database) as conn:
        return conn.execute("SELECT status, tx_hash FROM claims ORDER BY id").fetchall()


@pytest.mark.rule(6)
async def test_a_claim_killed_between_submit_and_receipt_is_reconciled_without_resubmitting(
    anvil_chain: DevChain, rpc_proxy: RpcProxy, upstream: Upstream, open_channel: ChannelFactory, tmp_path: Path
) -> None:
    from eth_account import Account

    key = bytes(Account.create().key)
    provider_address = Account.from_key(key).address
    await anvil_chain.fund(provider_address)
    pricing = tmp_path / "pricing.json"
    pricing.write_text(json.dumps({"demo": {"input": 1000, "output": 2000}}))
    database = tmp_path / "provider.db"
    port = free_port()
    env = {
        **os.environ,
        "PROVIDER_PRIVATE_KEY": "0x" + key.hex(),
        "CHAIN_ID": str(anvil_chain.chain_id),
        "RPC_URL": rpc_proxy.url,
        "DRAIN_CONTRACT": anvil_chain.contract,
        "UPSTREAM_BASE_URL": upstream.url,
        "PRICING_FILE": str(pricing),
        "DATABASE_PATH": str(database),
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "ADMIN_TOKEN": TOKEN,
        "CLAIM_INTERVAL": "0",
    }
    proc = await _start_provider(env, port)
    consumer = await open_channel(provider_address, on=anvil_chain)
    consumer.api = f"http://127.0.0.1:{port}/v1"
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=consumer.api, api_key="unused", max_retries=0)
    await paid_chat(client, consumer)
    await client.close()

    rpc_proxy.hold = {"eth_getTransactionReceipt"}  # the receipt never comes back...
    session = aiohttp.ClientSession()
    claim = asyncio.ensure_future(
        session.post(f"{consumer.api}/admin/claim?force=true", headers={"Authorization": f"Bearer {TOKEN}"})
    )
    for _ in range(400):
        if "eth_getTransactionReceipt" in rpc_proxy.calls:
            break
        await asyncio.sleep(0.05)
    assert "eth_sendRawTransaction" in rpc_proxy.calls
    proc.send_signal(signal.SIGKILL)  # ... and the process dies waiting for it
    await proc.wait()
    claim.cancel()
    await session.close()
    ((status, tx_hash),) = _claims(database)
    assert status == "pending" and tx_hash
    rpc_proxy.released.set()
    rpc_proxy.hold = set()

    sent_before_restart = rpc_proxy.calls.count("eth_sendRawTransaction")
    proc = await _start_provider(env, port)
    try:
        for _ in range(200):
            if _claims(database)[0][0] != "pending":
                break
            await asyncio.sleep(0.05)
        assert _claims(database) == [("confirmed", tx_hash)]
    finally:
        proc.terminate()
        await proc.wait()
    assert rpc_proxy.calls.count("eth_sendRawTransaction") == sent_before_restart  # no second submit
    assert await tx_count(anvil_chain, provider_address) == 1
    on_chain = await anvil_chain.client().get_channel(consumer.channel_id)
    assert await anvil_chain.usdc_balance(provider_address) == on_chain.claimed > 0


async def test_claim_and_status_from_the_command_line(
    anvil_chain: DevChain, provider_factory: ProviderFactory, open_channel: ChannelFactory, tmp_path: Path
) -> None:
    provider = await provider_factory(
        chain_client=ChainClient.over_http(anvil_chain.rpc_url or "", anvil_chain.contract), on=anvil_chain
    )
    consumer = await open_channel(provider, on=anvil_chain)
    await paid_chat(provider.client(), consumer)
    env = {
        **os.environ,
        "PROVIDER_PRIVATE_KEY": "0x" + provider.settings.provider_private_key.hex(),
        "CHAIN_ID": str(anvil_chain.chain_id),
        "RPC_URL": anvil_chain.rpc_url or "",
        "DRAIN_CONTRACT": anvil_chain.contract,
        "UPSTREAM_BASE_URL": "http://127.0.0.1:9/v1",
        "DATABASE_PATH": str(provider.settings.database_path),
    }

    async def cli(*args: str) -> tuple[int, Any]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "drain_provider", *args, env=env, cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await proc.communicate()
        assert proc.returncode is not None
        return proc.returncode, json.loads(out) if out else err.decode()

    code, status = await cli("status")
    assert code == 0 and status["pendingClaims"] == []
    assert int(status["books"]["unclaimed"]["baseUnits"]) == consumer.charged > 0
    code, result = await cli("claim")  # below the 10 USDC threshold: nothing to do
    assert code == 0 and result["claims"] == []
    code, result = await cli("claim", "--force")
    assert code == 0 and [c["status"] for c in result["claims"]] == ["confirmed"]
    code, status = await cli("status")
    assert status["books"]["unclaimed"]["baseUnits"] == "0" and status["lastClaim"]["status"] == "confirmed"
    assert await anvil_chain.usdc_balance(provider.address) == int(result["claims"][0]["amount"])
