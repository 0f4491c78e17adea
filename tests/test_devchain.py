"""The embedded chain's quick gas estimator: never below py-evm's exact answer (the transaction
succeeds with it), at most the 64/63 call margin above it."""

from __future__ import annotations

from typing import Any

import pytest
from eth.estimators.gas import binary_gas_search_exact
from eth_account import Account
from eth_tester.exceptions import TransactionFailed
from web3.providers.eth_tester import AsyncEthereumTesterProvider

from drain_provider.devtools.devchain import DevChain, quick_gas_estimate


def _estimators(chain: DevChain) -> Any:
    provider = chain.w3.provider
    assert isinstance(provider, AsyncEthereumTesterProvider)
    return provider.ethereum_tester.backend.chain


async def _both(chain: DevChain, call: Any, sender: str) -> tuple[int, int]:
    backend_chain = _estimators(chain)
    quick = await call.estimate_gas({"from": sender})
    backend_chain.gas_estimator = binary_gas_search_exact
    try:
        exact = await call.estimate_gas({"from": sender})
    finally:
        backend_chain.gas_estimator = quick_gas_estimate
    return quick, exact


async def test_quick_estimates_equal_the_exact_bisection(chain: DevChain) -> None:
    account = Account.create()
    consumer = account.address
    await chain.fund(consumer, usdc=5_000_000)
    token = chain.token_contract()
    calls = [
        token.functions.approve(chain.contract, 5_000_000),
        token.functions.mint(consumer, 1),
        token.functions.transfer(chain.funder, 1),
    ]
    for call in calls:  # no calls to other contracts: no margin needed
        quick, exact = await _both(chain, call, consumer)
        assert quick == exact
    await chain.client().send(account, token.functions.approve(chain.contract, 5_000_000))
    opening = chain.client().contract.functions.open(Account.create().address, 5_000_000, 86_400)
    quick, exact = await _both(chain, opening, consumer)  # calls the token's transferFrom
    assert exact <= quick <= exact * 64 // 63 + 2300


async def test_a_call_that_always_reverts_still_raises(chain: DevChain) -> None:
    broke = Account.create().address
    await chain.fund(broke)
    opening = chain.client().contract.functions.open(Account.create().address, 5_000_000, 86_400)
    with pytest.raises(TransactionFailed, match=r"\\x90\\xb8\\xec\\x18"):  # TransferFailed(): no USDC approved
        await opening.estimate_gas({"from": broke})
