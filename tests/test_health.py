"""/health, /health/live and /health/ready, read the way a load balancer and an operator read them:
every alert appears when its cause does and clears, without a restart, when the cause is gone
(a stuck ledger, an RPC that is down, gas running out and refilled, claims that do not happen,
an upstream that fails). Real parts throughout: the app, the ledger, anvil behind a JSON-RPC
proxy that can fail, the demo upstream."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import aiohttp
import pytest
from eth_utils.address import to_checksum_address
from helpers import (
    ChannelFactory,
    Provider,
    ProviderFactory,
    RpcProxy,
    free_port,
    paid_chat,
    refused_chat,
    wait_for,
)

import drain_provider.api
from drain_provider.api import health as health_module
from drain_provider.api.state import ROUTES
from drain_provider.chain import ChainClient
from drain_provider.devtools.demo_upstream import create_demo_upstream
from drain_provider.devtools.devchain import DevChain
from drain_provider.gas import CLAIM_GAS, GasGauge, GasLevel, format_gas
from drain_provider.ledger import SQLiteLedger
from drain_provider.protocol import keccak


async def get(provider: Provider, path: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(str(provider.server.make_url(path))) as resp:
        return resp.status, await resp.json()


async def alerts(provider: Provider) -> set[str]:
    _, body = await get(provider, "/health")
    return {alert["code"] for alert in body["alerts"]}


async def eventually_alerts(provider: Provider, wanted: set[str], timeout: float = 5.0) -> dict[str, Any]:
    """Poll /health until its alerts are exactly `wanted`; its body."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        _, body = await get(provider, "/health")
        if {alert["code"] for alert in body["alerts"]} == wanted:
            return body  # type: ignore[no-any-return]
        assert asyncio.get_running_loop().time() < deadline, body["alerts"]
        await asyncio.sleep(0.05)


async def test_a_healthy_provider(provider: Provider) -> None:
    upstream = provider.app[ROUTES].upstreams["default"].health
    await wait_for(lambda: provider.watcher.last_poll_at is not None and upstream.last_ok_at is not None)
    assert await get(provider, "/health/live") == (200, {"live": True})
    assert await get(provider, "/health/ready") == (200, {"ready": True, "reasons": []})
    status, body = await get(provider, "/health")
    assert status == 200 and (body["status"], body["ready"], body["alert"], body["alerts"]) == ("ok", True, None, [])
    rpc = body["rpc"]
    assert rpc["reachable"] is True and rpc["lastBlock"] >= 1 and rpc["lastBlockAgeSeconds"] >= 0
    assert rpc["lastError"] is None
    assert body["gas"]["claimsLeft"] >= 10 and int(body["gas"]["balanceWei"]) > 0
    assert body["upstream"]["lastOkAt"] is not None and body["upstream"]["lastError"] is None  # the start-up probe
    assert body["claimer"]["overdue"] == {"channels": 0, "unclaimed": {"baseUnits": "0", "usdc": "0"}}
    assert body["provider"] == provider.address and body["books"]["earned"]["baseUnits"] == "0"


async def test_a_stuck_ledger_is_not_ready_until_it_moves(provider: Provider, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer that does not answer (a hung disk) takes the server out of a load balancer, and
    puts it back when it answers again."""
    monkeypatch.setattr(health_module, "LEDGER_TIMEOUT", 0.2)
    stuck = threading.Event()
    ledger = provider.ledger
    assert isinstance(ledger, SQLiteLedger)  # stuck on SQLite's writer thread
    blocker = ledger.write(lambda conn: stuck.wait(10))
    status, body = await get(provider, "/health/ready")
    assert status == 503 and [r["code"] for r in body["reasons"]] == ["ledger_unavailable"]
    status, body = await get(provider, "/health")
    assert status == 503 and body["status"] == "degraded" and body["alert"] == "ledger_unavailable"
    assert (await get(provider, "/health/live"))[0] == 200  # alive: do not restart it for this
    stuck.set()
    await blocker
    assert await get(provider, "/health/ready") == (200, {"ready": True, "reasons": []})


async def test_rpc_down_is_an_alert_until_it_answers(
    anvil_chain: DevChain, rpc_proxy: RpcProxy, provider_factory: ProviderFactory
) -> None:
    provider = await provider_factory(
        chain_client=ChainClient.over_http(rpc_proxy.url, anvil_chain.contract),
        on=anvil_chain,
        chain_poll_interval=0.05,
    )
    await eventually_alerts(provider, set())
    rpc_proxy.fail_next = 10**9
    body = await eventually_alerts(provider, {"rpc_unreachable"})
    assert body["status"] == "degraded" and body["ready"] is True  # known channels are still served
    assert body["rpc"]["reachable"] is False and "failed" in body["rpc"]["lastError"]
    assert rpc_proxy.url.split("//")[1] not in str(body)
    rpc_proxy.fail_next = 0
    body = await eventually_alerts(provider, set())
    assert body["rpc"]["reachable"] is True


async def test_a_poll_that_crashes_does_not_stop_the_watcher(
    anvil_chain: DevChain,
    rpc_proxy: RpcProxy,
    provider_factory: ProviderFactory,
    open_channel: ChannelFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A ChannelClosed log of ours that does not decode (a lying RPC) fails the poll with
    something else than ChainUnavailable: /health says so, and the next good poll clears it."""
    chain_client = ChainClient.over_http(rpc_proxy.url, anvil_chain.contract)
    provider = await provider_factory(chain_client=chain_client, on=anvil_chain, chain_poll_interval=0.05)
    consumer = await open_channel(provider, on=anvil_chain)
    await paid_chat(provider.client(), consumer)
    await wait_for(lambda: provider.watcher.reachable is True)
    block = hex(int(await anvil_chain.w3.eth.block_number))
    bogus = {
        "address": anvil_chain.contract,
        "topics": [
            "0x" + keccak(b"ChannelClosed(bytes32,address,uint256)").hex(),
            consumer.channel_id,
            "0x" + "00" * 32,
        ],
        "data": "0x",  # the refund is missing
        "blockNumber": block,
        "blockHash": "0x" + "11" * 32,
        "transactionHash": "0x" + "22" * 32,
        "transactionIndex": "0x0",
        "logIndex": "0x0",
        "removed": False,
    }
    with caplog.at_level(logging.ERROR, logger="drain_provider.chainwatch"):
        rpc_proxy.answers["eth_getLogs"] = [bogus]
        await anvil_chain.w3.provider.make_request("evm_mine", [])
        body = await eventually_alerts(provider, {"rpc_unreachable"})
    assert body["rpc"]["lastError"] and "chain_watch_crashed" in caplog.text
    del rpc_proxy.answers["eth_getLogs"]
    await eventually_alerts(provider, set())
    assert provider.watcher.reachable is True


async def set_balance(chain: DevChain, address: str, wei: int) -> None:
    await chain.w3.provider.make_request("anvil_setBalance", [to_checksum_address(address), hex(wei)])


async def test_gas_alerts_follow_the_balance_without_a_restart(
    anvil_chain: DevChain, provider_factory: ProviderFactory, caplog: pytest.LogCaptureFixture
) -> None:
    provider = await provider_factory(
        chain_client=ChainClient.over_http(anvil_chain.rpc_url or "", anvil_chain.contract),
        on=anvil_chain,
        chain_poll_interval=0.05,
    )
    await wait_for(lambda: provider.watcher.last_poll_at is not None)
    assert await alerts(provider) == set()
    gas = provider.watcher.gas
    assert gas is not None and gas.fee_per_gas
    claim = CLAIM_GAS * gas.fee_per_gas
    with caplog.at_level(logging.WARNING, logger="drain_provider.gas"):
        await set_balance(anvil_chain, provider.address, 3 * claim)
        body = await eventually_alerts(provider, {"low_gas"})
        assert 2 <= body["gas"]["claimsLeft"] < 10 and "LOW_GAS_CLAIMS=10" in body["alerts"][0]["message"]
        await set_balance(anvil_chain, provider.address, 0)
        body = await eventually_alerts(provider, {"insufficient_gas_funds"})
        assert body["gas"]["balanceWei"] == "0"
    changes = [r.message.split()[0] for r in caplog.records if r.name == "drain_provider.gas"]
    assert changes == ["gas_low", "gas_empty"]  # one line per change, not one per poll
    await set_balance(anvil_chain, provider.address, 10**18)
    await eventually_alerts(provider, set())


async def test_a_claim_blocked_by_gas_clears_when_the_account_is_refilled(
    anvil_chain: DevChain, provider_factory: ProviderFactory, open_channel: ChannelFactory
) -> None:
    """The node refuses the claim for its gas: the alert holds until a poll reads a balance that
    pays for that claim, then the claim goes through."""
    provider = await provider_factory(
        chain_client=ChainClient.over_http(anvil_chain.rpc_url or "", anvil_chain.contract),
        on=anvil_chain,
        chain_poll_interval=0.05,
        claim_threshold=1,
        claim_retry_seconds=0.01,
    )
    consumer = await open_channel(provider, on=anvil_chain)
    await paid_chat(provider.client(), consumer)
    await set_balance(anvil_chain, provider.address, 1000)  # not 0: the claim gets as far as its gas
    (outcome,) = await provider.claimer.cycle()
    assert (outcome.status, outcome.error) == ("failed", "insufficient_gas_funds")
    await eventually_alerts(provider, {"insufficient_gas_funds"})
    await set_balance(anvil_chain, provider.address, 10**18)
    await eventually_alerts(provider, set())
    (outcome,) = await provider.claimer.cycle()
    assert outcome.status == "confirmed"


async def test_claims_that_do_not_happen_are_overdue_until_they_do(
    anvil_chain: DevChain, rpc_proxy: RpcProxy, provider_factory: ProviderFactory, open_channel: ChannelFactory
) -> None:
    """Earnings over the threshold while the RPC is down: claims_overdue after two claim cycles
    (not `ok`, as a probe once found), gone once the RPC is back and the claim is made."""
    provider = await provider_factory(
        chain_client=ChainClient.over_http(rpc_proxy.url, anvil_chain.contract),
        on=anvil_chain,
        chain_poll_interval=0.05,
        claim_interval=0.1,
        claim_retry_seconds=0.1,
        claim_threshold=1,
    )
    consumer = await open_channel(provider, on=anvil_chain)
    rpc_proxy.hold = {"eth_estimateGas"}  # the claim that follows the payment waits here...
    await paid_chat(provider.client(), consumer)
    await wait_for(lambda: "eth_estimateGas" in rpc_proxy.calls)
    rpc_proxy.fail_next = 10**9  # ...while the RPC goes down
    rpc_proxy.released.set()
    body = await eventually_alerts(provider, {"rpc_unreachable", "claims_overdue"})
    overdue = body["claimer"]["overdue"]
    assert overdue["channels"] == 1 and int(overdue["unclaimed"]["baseUnits"]) == consumer.charged
    # The cycle that was held may end "well" (its claim failing is an outcome, not a failed
    # cycle) after the alerts show; the next one cannot even read the chain.
    claimer = provider.claimer
    await wait_for(lambda: (claimer.last_cycle_at or 0) > (claimer.last_success_at or 0))
    _, body = await get(provider, "/health")
    assert body["claimer"]["lastCycleAt"] > body["claimer"]["lastSuccessAt"]
    rpc_proxy.fail_next = 0
    await eventually_alerts(provider, set())

    async def claimed() -> int:
        return (await anvil_chain.client().get_channel(consumer.channel_id)).claimed

    deadline = asyncio.get_running_loop().time() + 5
    while await claimed() < consumer.charged:
        assert asyncio.get_running_loop().time() < deadline, "not claimed"
        await asyncio.sleep(0.05)


async def test_an_upstream_failure_is_an_alert_until_a_call_succeeds(
    provider_factory: ProviderFactory, open_channel: ChannelFactory
) -> None:
    key = "sk-upstream-SECRET-0123456789"
    provider = await provider_factory(openai_api_key=key)
    consumer = await open_channel(provider)
    error = await refused_chat(provider.client(), consumer, content='!demo {"status": 401, "echo_key": true}')
    assert error.status_code == 502
    body = await eventually_alerts(provider, {"upstream_failing"})
    assert body["upstream"]["lastError"] == "status 401" and body["ready"] is True
    assert "SECRET" not in str(body) and "127.0.0.1" not in str(body["upstream"])
    await paid_chat(provider.client(), consumer)
    body = await eventually_alerts(provider, set())
    assert body["upstream"]["lastOkAt"] > body["upstream"]["lastErrorAt"]


async def test_start_up_warns_of_what_may_fix_itself(
    provider_factory: ProviderFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """An empty gas account, an upstream that does not answer, a priced model the upstream does
    not list: the server starts, and says so once, at start."""
    with caplog.at_level(logging.WARNING):
        provider = await provider_factory(fund=False)
        await wait_for(lambda: "start_check name=models" in caplog.text and "gas_empty" in caplog.text)
        down = await provider_factory(upstream_base_url="http://127.0.0.1:9/v1")
        await wait_for(lambda: "start_check name=upstream result=warn" in caplog.text)
    assert 'detail="priced but not listed by the upstream: gpt-4o"' in caplog.text  # the demo lists "demo" only
    assert await alerts(provider) == {"insufficient_gas_funds"}
    assert await alerts(down) == {"upstream_failing"}


async def test_an_upstream_that_comes_up_later_clears_its_alert_without_traffic(
    provider_factory: ProviderFactory, aiohttp_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(drain_provider.api, "UPSTREAM_PROBE_INTERVAL", 0.05)
    port = free_port()
    provider = await provider_factory(upstream_base_url=f"http://127.0.0.1:{port}/v1")
    body = await eventually_alerts(provider, {"upstream_failing"})
    assert body["upstream"]["lastError"] == "ClientConnectorError"
    await aiohttp_server(create_demo_upstream(), port=port)
    await eventually_alerts(provider, set())


def test_low_gas_claims_draws_the_line() -> None:
    """LOW_GAS_CLAIMS claims' worth at the fee a claim would offer; 0 turns `low` off, never `empty`."""
    fee = 30 * 10**9
    for low_claims, balance, level in [
        (10, 9 * CLAIM_GAS * fee, GasLevel.LOW),
        (10, 10 * CLAIM_GAS * fee, GasLevel.OK),
        (0, CLAIM_GAS * fee, GasLevel.OK),
        (0, CLAIM_GAS * fee - 1, GasLevel.EMPTY),
    ]:
        gauge = GasGauge("0x" + "12" * 20, low_claims)
        assert gauge.level is None  # not read yet: no alert either way
        gauge.observe(balance, fee)
        assert gauge.level is level, (low_claims, balance)
    assert (format_gas(1_234_567_890_123_456_789), format_gas(10**18), format_gas(0)) == ("1.234567", "1", "0")
