"""V1 and V2 at once over JSON-RPC, against a real anvil node: a new channel is looked up on both
contracts at once (and only then), each is claimed and its close booked on its own contract, a
lookup that failed is a 503 only when no contract found the channel, and an id that exists on
both contracts is the one the voucher is signed for."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest
from eth_account import Account
from helpers import (
    FEE_BPS,
    USDC,
    ChannelFactory,
    Provider,
    ProviderFactory,
    RpcProxy,
    paid_chat,
    refused_chat,
    wait_for,
)
from web3.logs import DISCARD

from drain_provider.chain import ChainClient
from drain_provider.consumer import DrainConsumer
from drain_provider.devtools.devchain import DevChain
from drain_provider.protocol import Domain, sign_voucher
from drain_provider.states import ChannelStatus, ClaimStatus


async def served_over(proxy: RpcProxy, factory: ProviderFactory, on: DevChain, **overrides: Any) -> Provider:
    """A provider of `on`'s V2 and V1 contracts, reading the chain through `proxy`."""
    provider = await factory(chain_client=ChainClient.over_http(proxy.url, on.contract), on=on, v1=True, **overrides)
    await wait_for(lambda: provider.watcher.last_poll_at is not None)
    return provider


async def test_v1_and_v2_over_json_rpc(
    anvil_chain: DevChain, rpc_proxy: RpcProxy, provider_factory: ProviderFactory, open_channel: ChannelFactory
) -> None:
    fee_chain = await anvil_chain.fresh_contract(fee_bps=FEE_BPS)
    provider = await served_over(rpc_proxy, provider_factory, fee_chain, chain_poll_interval=0.1)
    v2 = await open_channel(provider, on=fee_chain)
    v1 = await open_channel(provider, on=fee_chain, version="v1", duration=1200)
    client = provider.client()
    for consumer in (v1, v2):
        rpc_proxy.calls.clear()
        await paid_chat(client, consumer)
        # A new channel: one getChannel on each contract, at once; nothing else.
        assert [c for c in rpc_proxy.calls if c == "eth_call"] == ["eth_call", "eth_call"]
    calls = len([c for c in rpc_proxy.calls if c == "eth_call"])
    for consumer in (v1, v2, v1):
        await paid_chat(client, consumer)
    assert len([c for c in rpc_proxy.calls if c == "eth_call"]) == calls  # known: no chain read

    outcomes = {o.channel_id: o for o in await provider.claimer.cycle(force=True)}
    assert {o.status for o in outcomes.values()} == {ClaimStatus.CONFIRMED}
    paid_v1, paid_v2 = outcomes[v1.channel_id].amount, outcomes[v2.channel_id].amount
    fee = paid_v2 * FEE_BPS // 10_000
    assert await fee_chain.usdc_balance(provider.address) == paid_v1 + paid_v2 - fee
    assert (await fee_chain.client("v1").get_channel(v1.channel_id)).claimed == paid_v1
    assert (await fee_chain.client().get_channel(v2.channel_id)).claimed == paid_v2

    await fee_chain.travel(seconds=1300)
    v1_client = fee_chain.client("v1")
    result = await v1_client.send(v1.account, v1_client.contract.functions.close(bytes.fromhex(v1.channel_id[2:])))
    assert result.succeeded
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        record = await provider.ledger.get_channel(v1.channel_id)
        assert record is not None
        if record.status is ChannelStatus.CLOSED:
            break
        assert asyncio.get_running_loop().time() < deadline, "the V1 close was not booked"
        await asyncio.sleep(0.05)
    assert (record.close_kind, record.claimed, record.fee, record.lost) == ("expired", paid_v1, 0, 0)
    # One eth_getLogs a poll reads the closes of both contracts.
    assert "eth_getLogs" in rpc_proxy.calls


async def test_a_lookup_that_failed_is_a_503_only_if_no_contract_found_the_channel(
    anvil_chain: DevChain, rpc_proxy: RpcProxy, provider_factory: ProviderFactory, open_channel: ChannelFactory
) -> None:
    provider = await served_over(rpc_proxy, provider_factory, anvil_chain, chain_poll_interval=3600)
    v1 = await open_channel(provider, on=anvil_chain, version="v1")
    v2 = await open_channel(provider, on=anvil_chain)
    rpc_proxy.fail_calls_to = {anvil_chain.contract.lower()}  # the V2 contract cannot be read
    await paid_chat(provider.client(), v1)  # found on V1: the V2 failure does not matter
    error = await refused_chat(provider.client(), v2)  # on V2, which could not be read
    assert (error.status_code, error.response.headers["X-DRAIN-Error"]) == (503, "chain_unavailable")
    rpc_proxy.fail_calls_to = set()
    raw = await paid_chat(provider.client(), v2)
    assert int(raw.headers["X-DRAIN-Cost"]) > 0
    record = await provider.ledger.get_channel(v2.channel_id)
    assert record is not None and record.contract == anvil_chain.contract


async def test_an_id_on_both_contracts_is_the_one_the_voucher_is_signed_for(
    anvil_chain: DevChain, rpc_proxy: RpcProxy, provider_factory: ProviderFactory
) -> None:
    """Channel ids are keccak(consumer, provider, timestamp, the consumer's count of channels on
    that contract): a new consumer opening on both contracts in one block gets the same id on
    each. The gate stores the one under whose domain the voucher recovers to the consumer."""
    provider = await served_over(rpc_proxy, provider_factory, anvil_chain, chain_poll_interval=3600)
    account = Account.create()
    await anvil_chain.fund(account.address, usdc=2 * 10 * USDC)
    clients = [anvil_chain.client(), anvil_chain.client("v1")]
    token = anvil_chain.token_contract()
    for client in clients:
        assert (await client.send(account, token.functions.approve(client.address, 10 * USDC))).succeeded
    node = anvil_chain.w3.provider
    nonce = await clients[0].pending_nonce(account.address)
    opens = [
        await client.prepare(
            account, client.contract.functions.open(provider.address, 10 * USDC, 86_400), nonce=nonce + i
        )
        for i, client in enumerate(clients)
    ]
    await node.make_request("evm_setAutomine", [False])
    try:
        for tx in opens:  # both in one block: the same timestamp
            await clients[0].broadcast(tx.raw)
        await node.make_request("evm_mine", [])
    finally:
        await node.make_request("evm_setAutomine", [True])
    ids = set()
    for client, tx in zip(clients, opens, strict=True):
        result = await client.wait_receipt(tx.tx_hash, poll=0.01)
        assert result is not None and result.succeeded
        (opened,) = client.contract.events.ChannelOpened().process_receipt(result.receipt, errors=DISCARD)
        ids.add("0x" + bytes(opened["args"]["channelId"]).hex())
    (channel_id,) = ids  # one id, on both contracts

    # Signed under neither contract's domain: refused, and nothing stored (which one is not known).
    stray = sign_voucher(account.key, Domain(anvil_chain.chain_id + 1, anvil_chain.contract_v1), channel_id, 10**5, 1)
    with pytest.raises(openai.APIStatusError) as info:
        await provider.client().chat.completions.create(
            model="demo",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"X-DRAIN-Voucher": stray.header_value()},
        )
    assert info.value.response.headers["X-DRAIN-Error"] == "invalid_signature"
    assert await provider.ledger.get_channel(channel_id) is None
    v1 = DrainConsumer(account, Domain(anvil_chain.chain_id, anvil_chain.contract_v1), channel_id, 10 * USDC)
    await paid_chat(provider.client(), v1)
    record = await provider.ledger.get_channel(channel_id)
    assert record is not None and record.contract == anvil_chain.contract_v1
