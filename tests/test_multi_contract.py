"""One provider serves the channels of both DRAIN deployments of its chain, V2 and V1, at once:
each channel is found on its own contract, verified under that contract's EIP-712 domain, claimed
there (V2 with its fee, V1 without), and its close booked from that contract's events. A ledger
from before channels had a contract keeps its channels on the contract it was bound to."""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from eth_account import Account
from helpers import (
    FEE_BPS,
    ChannelFactory,
    Provider,
    ProviderFactory,
    make_settings,
    paid_chat,
    refused_chat,
    wait_for,
)

from drain_provider.api.state import GATE
from drain_provider.chain import ChainClient
from drain_provider.checks import Result, check_chain, open_ledger
from drain_provider.config import ConfigError
from drain_provider.consumer import DrainConsumer
from drain_provider.devtools.dev import dev_settings
from drain_provider.devtools.devchain import DevChain
from drain_provider.ledger import MIGRATIONS, LedgerMismatch, SQLiteLedger
from drain_provider.protocol import ChannelState, ContractRef, Domain, sign_voucher
from drain_provider.states import ChannelStatus, ClaimStatus


async def both(factory: ProviderFactory, on: DevChain, **overrides: Any) -> Provider:
    """A provider serving the V2 and the V1 contract of `on`, its chain watcher polling quickly."""
    provider = await factory(on=on, v1=True, chain_poll_interval=0.05, **overrides)
    await wait_for(lambda: provider.watcher.last_poll_at is not None)
    return provider


def cross_signed(consumer: DrainConsumer, contract: str) -> str:
    """The consumer's next voucher, signed under the domain of `contract` instead of its own."""
    other = Domain(consumer.domain.chain_id, contract)
    amount = max(consumer.amount, consumer.charged) + 50_000
    return sign_voucher(consumer.account.key, other, consumer.channel_id, amount, consumer.nonce + 1).header_value()


async def health(provider: Provider) -> Any:
    async with aiohttp.ClientSession() as session, session.get(provider.url.removesuffix("/v1") + "/health") as resp:
        return await resp.json()


async def test_v1_and_v2_channels_are_served_claimed_and_closed_each_on_its_own_contract(
    provider_factory: ProviderFactory, open_channel: ChannelFactory, fee_chain: DevChain
) -> None:
    provider = await both(provider_factory, fee_chain)
    v2 = await open_channel(provider, on=fee_chain)
    v1 = await open_channel(provider, on=fee_chain, version="v1", duration=1200)
    assert v1.domain.verifying_contract == fee_chain.contract_v1
    client = provider.client()
    for consumer in (v1, v2, v1, v2):
        raw = await paid_chat(client, consumer)
        assert int(raw.headers["X-DRAIN-Cost"]) > 0
    records = {c.channel_id: await provider.ledger.get_channel(c.channel_id) for c in (v1, v2)}
    assert {cid: r.contract for cid, r in records.items() if r} == {
        v1.channel_id: fee_chain.contract_v1,
        v2.channel_id: fee_chain.contract,
    }

    # A voucher is worth something only under its channel's own contract's domain.
    before = await provider.ledger.fetchone("SELECT COUNT(*) FROM vouchers")
    for consumer, wrong in ((v1, fee_chain.contract), (v2, fee_chain.contract_v1)):
        with pytest.raises(openai.APIStatusError) as info:
            await client.chat.completions.create(
                model="demo",
                messages=[{"role": "user", "content": "hi"}],
                extra_headers={"X-DRAIN-Voucher": cross_signed(consumer, wrong)},
            )
        response = info.value.response
        assert (response.status_code, response.headers["X-DRAIN-Error"]) == (402, "invalid_signature")
        assert consumer.domain.verifying_contract in response.json()["error"]["message"]
    assert await provider.ledger.fetchone("SELECT COUNT(*) FROM vouchers") == before

    # Each channel is claimed on its own contract: V2 takes its fee, V1 has none.
    outcomes = {o.channel_id: o for o in await provider.claimer.cycle(force=True)}
    assert {o.status for o in outcomes.values()} == {ClaimStatus.CONFIRMED}
    paid_v1, paid_v2 = outcomes[v1.channel_id].amount, outcomes[v2.channel_id].amount
    assert paid_v1 >= v1.charged and paid_v2 >= v2.charged
    fee = paid_v2 * FEE_BPS // 10_000
    assert await fee_chain.usdc_balance(provider.address) == paid_v1 + paid_v2 - fee
    assert (await fee_chain.client("v1").get_channel(v1.channel_id)).claimed == paid_v1
    assert (await fee_chain.client().get_channel(v2.channel_id)).claimed == paid_v2
    claims = {row[0]: row[1:] for row in await provider.ledger.fetchall("SELECT channel_id, payout, fee FROM claims")}
    assert claims == {v1.channel_id: (paid_v1, 0), v2.channel_id: (paid_v2, fee)}
    assert (await health(provider))["contracts"] == [
        {"address": fee_chain.contract, "version": "v2", "feeBps": FEE_BPS},
        {"address": fee_chain.contract_v1, "version": "v1", "feeBps": 0},
    ]

    # The V1 consumer closes after expiry: the watcher books it from V1's ChannelClosed.
    await fee_chain.travel(seconds=1300)
    v1_client = fee_chain.client("v1")
    result = await v1_client.send(v1.account, v1_client.contract.functions.close(bytes.fromhex(v1.channel_id[2:])))
    assert result.succeeded

    async def booked() -> bool:
        record = await provider.ledger.get_channel(v1.channel_id)
        return record is not None and record.status is ChannelStatus.CLOSED

    deadline = asyncio.get_running_loop().time() + 5
    while not await booked():
        assert asyncio.get_running_loop().time() < deadline, "the V1 close was not booked"
        await asyncio.sleep(0.02)
    record = await provider.ledger.get_channel(v1.channel_id)
    assert record is not None
    assert (record.close_kind, record.claimed, record.fee, record.lost) == ("expired", paid_v1, 0, 0)
    assert record.contract == fee_chain.contract_v1
    still = await provider.ledger.get_channel(v2.channel_id)
    assert still is not None and still.status is ChannelStatus.OPEN


async def test_the_gate_names_each_channels_contract_domain_and_client(
    provider_factory: ProviderFactory, open_channel: ChannelFactory, chain: DevChain
) -> None:
    provider = await provider_factory(v1=True)
    gate = provider.app[GATE]
    assert gate.contracts == chain.contracts
    for version, address in (("v2", chain.contract), ("v1", chain.contract_v1)):
        consumer = await open_channel(provider, version=version)
        await paid_chat(provider.client(), consumer)
        record = await provider.ledger.get_channel(consumer.channel_id)
        assert record is not None
        assert gate.contract_of(record) == ContractRef(address, version)
        assert gate.domain_of(record) == Domain(chain.chain_id, address) == consumer.domain
        assert gate.chain_of(record).address == address and gate.chain_of(record).version == version
        # One connection for all of them.
        assert gate.chain_of(record).w3 is gate.chain.w3


async def test_a_provider_serving_only_v2_does_not_know_v1_channels(
    provider_factory: ProviderFactory, open_channel: ChannelFactory
) -> None:
    provider = await provider_factory()
    consumer = await open_channel(provider, version="v1")
    error = await refused_chat(provider.client(), consumer)
    assert error.response.headers["X-DRAIN-Error"] == "channel_not_found"


# --- the ledger ----------------------------------------------------------------------------------


CONTRACT_MIGRATION = next(i for i, script in enumerate(MIGRATIONS) if "ADD COLUMN contract" in script)


def ledger_before_contracts(path: Path, chain_id: int, bound: str, channel_id: str, state: ChannelState) -> None:
    """A ledger as the last release left it: schema up to the migration before channels had a
    contract, bound to `bound`, holding one open channel with earnings not yet claimed."""
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at REAL)")
        for version, script in enumerate(MIGRATIONS[:CONTRACT_MIGRATION], start=1):
            conn.executescript(script)
            conn.execute("INSERT INTO schema_migrations VALUES (?, 0)", (version,))
        conn.execute(
            "INSERT INTO ledger_meta (key, value) VALUES ('chain_id', ?), ('contract', ?)",
            (str(chain_id), bound.lower()),
        )
        conn.execute(
            """INSERT INTO channels (channel_id, consumer, provider, deposit, claimed, expiry, charged,
                                     synced_at, created_at)
               VALUES (?, ?, ?, ?, 0, ?, 1000, 0, 0)""",
            (channel_id, state.consumer, state.provider, state.deposit, state.expiry),
        )


async def test_a_ledger_from_before_keeps_its_channels_on_the_bound_contract(
    provider_factory: ProviderFactory, open_channel: ChannelFactory, chain: DevChain, tmp_path: Path
) -> None:
    key = bytes(Account.create().key)
    provider_address = Account.from_key(key).address
    consumer = await open_channel(provider_address)
    state = await chain.client().get_channel(consumer.channel_id)
    path = tmp_path / "old.db"
    ledger_before_contracts(path, chain.chain_id, chain.contract, consumer.channel_id, state)

    # V1 served beside the bound V2: the ledger opens, its channel is on V2, and it is served.
    provider = await provider_factory(v1=True, database_path=path, provider_private_key=key)
    record = await provider.ledger.get_channel(consumer.channel_id)
    assert record is not None and (record.contract, record.charged) == (chain.contract, 1000)
    consumer.api, consumer.charged = provider.url, 1000
    raw = await paid_chat(provider.client(), consumer)
    assert int(raw.headers["X-DRAIN-Total"]) > 1000
    await provider.server.close()

    # Serving V1 alone: the ledger's contract would not be served, nor its earnings claimed.
    only_v1 = replace(provider.settings, contracts=(ContractRef(chain.contract_v1, "v1"),))
    with pytest.raises(ConfigError, match=f"DATABASE_PATH: .*belongs to chain {chain.chain_id}"):
        await open_ledger(only_v1)


async def test_a_ledger_refuses_to_drop_a_contract_with_earnings_unclaimed(tmp_path: Path) -> None:
    v2, v1 = "0x" + "aB" * 20, "0x" + "Cd" * 20
    ledger = SQLiteLedger(tmp_path / "l.db")
    await ledger.open()
    await ledger.bind(chain_id=80002, contract=v2, served=[v2, v1])
    state = ChannelState("0x" + "11" * 20, "0x" + "22" * 20, 10**6, 0, 2**40)
    await ledger.add_channel("0x" + "01" * 32, state, contract=v1)
    await ledger.bind(chain_id=80002, contract=v2)  # nothing earned on V1 yet: V2 alone may be served
    await ledger.write(lambda conn: conn.execute("UPDATE channels SET charged = 500"))
    with pytest.raises(LedgerMismatch, match=f"1 open channel.* 500 base units unclaimed on contract {v1}"):
        await ledger.bind(chain_id=80002, contract=v2)
    await ledger.bind(chain_id=80002, contract=v2, served=[v2, v1])
    await ledger.close()


async def test_each_contract_is_checked_at_start(chain: DevChain, tmp_path: Path) -> None:
    """A V1 served beside the V2 must be there and look like a V1 (no feeBps())."""
    settings = make_settings(chain, "http://upstream.invalid/v1", tmp_path / "l.db", contracts=chain.contracts)
    base = ChainClient(chain.w3, chain.contract)
    rows = await check_chain([base.for_contract(c) for c in settings.contracts], settings)
    contracts = [(row.result, row.detail) for row in rows if row.name == "contract"]
    assert contracts == [
        (Result.OK, f"{chain.contract}, v2"),
        (Result.OK, f"{chain.contract_v1}, v1 (or not a DrainChannel: no feeBps())"),
    ]
    swapped = (ContractRef(chain.contract, "v2"), ContractRef(chain.contract, "v1"))
    rows = await check_chain([base.for_contract(c) for c in swapped], settings)
    assert rows[-1].result is Result.WARN and "looks like v2, but is served as v1" in rows[-1].detail
    missing = (ContractRef(chain.contract, "v2"), ContractRef("0x" + "ab" * 20, "v1"))
    rows = await check_chain([base.for_contract(c) for c in missing], settings)
    assert (rows[-1].result, rows[-1].setting) == (Result.FAIL, "DRAIN_CONTRACT_V1")


def test_dev_serves_both_contracts(chain: DevChain, tmp_path: Path) -> None:
    env = {"DATABASE_PATH": str(tmp_path / "dev.db")}
    settings = dev_settings(env, chain, bytes(Account.create().key), "http://127.0.0.1:9/v1")
    assert settings.contracts == chain.contracts
    only_v2 = dev_settings(
        {**env, "DRAIN_CONTRACT_VERSION": "v2"}, chain, bytes(Account.create().key), "http://127.0.0.1:9/v1"
    )
    assert only_v2.contracts == (ContractRef(chain.contract, "v2"),)
