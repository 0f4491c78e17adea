"""`withdraw`: after real claims, the provider's USDC goes to PAYOUT_ADDRESS (or --to), exactly
the balance or exactly --amount, and the account keeps its POL less the transfer's gas. Without
the POL the gas may cost, nothing is sent and one line says how much to send. A bad argument is
exit 2 before anything is read from the chain; the command runs on anvil as an operator runs it."""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from eth_account import Account
from helpers import USDC, ChannelFactory, Provider, ProviderFactory, paid_chat

from drain_provider.devtools.devchain import DevChain
from drain_provider.payout import WithdrawError, parse_request, withdraw
from drain_provider.protocol import format_usdc
from drain_provider.states import ClaimStatus


def new_address() -> str:
    return str(Account.create().address)


async def earn(provider: Provider, open_channel: ChannelFactory, calls: int = 3) -> int:
    """Paid calls, then a forced claim: the USDC the provider's account was paid."""
    consumer = await open_channel(provider)
    client = provider.client()
    for _ in range(calls):
        await paid_chat(client, consumer)
    (outcome,) = await provider.claimer.cycle(force=True)
    assert outcome.status is ClaimStatus.CONFIRMED
    return outcome.amount


async def test_withdraw_moves_exactly_the_balance_and_leaves_the_gas(
    chain: DevChain, provider_factory: ProviderFactory, open_channel: ChannelFactory
) -> None:
    payout = new_address()
    provider = await provider_factory(payout_address=payout)
    await earn(provider, open_channel)
    held = await chain.usdc_balance(provider.address)
    assert held > 0
    pol_before = await chain.client().balance(provider.address)
    plans: list[str] = []
    printed: list[str] = []

    def confirm(plan: str) -> bool:
        plans.append(plan)
        return True

    request = parse_request(provider.settings, amount=None, to=None)
    assert await withdraw(provider.settings, chain.client(), request, confirm=confirm, out=printed.append) == 0

    assert await chain.usdc_balance(payout) == held
    assert await chain.usdc_balance(provider.address) == 0
    (plan,) = plans
    assert f"send {format_usdc(held)} USDC" in plan and payout in plan
    tx_hash = printed[1].split()[1]
    receipt = await chain.w3.eth.get_transaction_receipt(tx_hash)  # type: ignore[arg-type]
    gas_paid = receipt["gasUsed"] * receipt["effectiveGasPrice"]
    assert await chain.client().balance(provider.address) == pol_before - gas_paid
    assert printed[0] == f"sent {format_usdc(held)} USDC to {payout}"
    assert "keeps 0 USDC" in printed[2]


async def test_withdraw_an_amount_to_another_address(
    chain: DevChain, provider_factory: ProviderFactory, open_channel: ChannelFactory
) -> None:
    provider = await provider_factory(payout_address=new_address())
    await earn(provider, open_channel)
    held = await chain.usdc_balance(provider.address)
    to = new_address()
    request = parse_request(provider.settings, amount="0.000123", to=to.lower())  # any case
    assert await withdraw(provider.settings, chain.client(), request, confirm=lambda plan: True, out=print) == 0
    assert await chain.usdc_balance(to) == 123
    assert await chain.usdc_balance(provider.address) == held - 123
    assert await chain.usdc_balance(provider.settings.payout_address or "") == 0

    # More than it holds: refused as an argument, nothing moves.
    too_much = parse_request(provider.settings, amount=format_usdc(held), to=to)
    with pytest.raises(WithdrawError) as refused:
        await withdraw(provider.settings, chain.client(), too_much, confirm=lambda plan: True)
    assert refused.value.code == 2 and "holds only" in str(refused.value)
    # Asked and declined: nothing moves.
    assert await withdraw(provider.settings, chain.client(), request, confirm=lambda plan: False, out=print) == 1
    assert await chain.usdc_balance(to) == 123


@pytest.mark.parametrize("pol", [0, 10**9], ids=["no POL", "too little POL"])
async def test_not_enough_gas_sends_nothing(chain: DevChain, provider_factory: ProviderFactory, pol: int) -> None:
    provider = await provider_factory(payout_address=new_address(), fund=False)
    await chain.fund(provider.address, usdc=5 * USDC, eth_wei=pol)
    request = parse_request(provider.settings, amount=None, to=None)
    with pytest.raises(WithdrawError) as refused:
        await withdraw(provider.settings, chain.client(), request, confirm=lambda plan: True)
    message = str(refused.value)
    assert refused.value.code == 1 and "\n" not in message
    assert message.startswith("not enough POL for the gas") and provider.address in message
    assert ("send it at least" in message) if pol else ("holds 0 POL" in message)
    assert await chain.usdc_balance(provider.address) == 5 * USDC
    assert await chain.client().balance(provider.address) == pol


async def test_nothing_to_withdraw(chain: DevChain, provider_factory: ProviderFactory) -> None:
    provider = await provider_factory(payout_address=new_address())
    with pytest.raises(WithdrawError) as refused:
        await withdraw(
            provider.settings, chain.client(), parse_request(provider.settings, amount=None, to=None), confirm=bool
        )
    assert refused.value.code == 1 and "nothing to withdraw" in str(refused.value)


@pytest.mark.parametrize(
    ("amount", "to", "needle"),
    [
        ("1.2345678", None, "--amount"),
        ("-1", None, "--amount"),
        ("abc", None, "--amount"),
        ("0", None, "above 0"),
        ("1e3", None, "--amount"),
        (None, "0x1234", "--to"),
        (None, "not an address", "--to"),
    ],
)
async def test_bad_arguments_are_refused(
    provider_factory: ProviderFactory, amount: str | None, to: str | None, needle: str
) -> None:
    provider = await provider_factory(payout_address=new_address(), fund=False)
    with pytest.raises(WithdrawError) as refused:
        parse_request(provider.settings, amount=amount, to=to)
    assert refused.value.code == 2 and needle in str(refused.value)


async def test_a_payout_address_is_needed_and_is_not_the_account(provider_factory: ProviderFactory) -> None:
    provider = await provider_factory(fund=False)
    with pytest.raises(WithdrawError, match="set PAYOUT_ADDRESS"):
        parse_request(provider.settings, amount=None, to=None)
    itself = replace(provider.settings, payout_address=provider.address)
    with pytest.raises(WithdrawError, match="own account"):
        parse_request(itself, amount=None, to=None)


# --- the command, on anvil ---------------------------------------------------------------------


async def run(cwd: Path, env: dict[str, str], *args: str) -> tuple[int, str, str]:
    base = {k: os.environ[k] for k in ("PATH", "LANG", "PYTHONPATH", "SYSTEMROOT") if k in os.environ}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "drain_provider", "withdraw", *args, env={**base, **env}, cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_the_command_on_anvil(anvil_chain: DevChain, tmp_path: Path) -> None:
    key = bytes(Account.create().key)
    provider, payout = Account.from_key(key).address, new_address()
    await anvil_chain.fund(provider, usdc=7_250_000)
    env = {
        "PROVIDER_PRIVATE_KEY": "0x" + key.hex(),
        "CHAIN_ID": str(anvil_chain.chain_id),
        "RPC_URL": str(anvil_chain.rpc_url),
        "DRAIN_CONTRACT": anvil_chain.contract,
        "UPSTREAM_BASE_URL": "http://127.0.0.1:9/v1",
        "PAYOUT_ADDRESS": payout,
    }
    refusals = await asyncio.gather(
        run(tmp_path, env),  # not on a terminal, no --yes
        run(tmp_path, env, "--yes", "--amount", "1.2345678"),
    )
    for code, out, err in refusals:
        assert code == 2 and out == "", err
        assert len(err.strip().splitlines()) == 1 and err.startswith("drain-provider: "), err
    assert "--yes" in refusals[0][2] and "--amount" in refusals[1][2]
    assert await anvil_chain.usdc_balance(provider) == 7_250_000

    code, out, err = await run(tmp_path, env, "--yes")
    assert code == 0, err
    assert out.startswith(f"sent 7.25 USDC to {payout}\ntx 0x")
    assert await anvil_chain.usdc_balance(payout) == 7_250_000
    assert await anvil_chain.usdc_balance(provider) == 0
    assert key.hex() not in out + err
