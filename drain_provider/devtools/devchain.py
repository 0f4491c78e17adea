"""A development chain with the DRAIN contracts deployed: embedded, or an external dev node.

Embedded: py-evm in this process through web3's async eth-tester provider; nothing to install
or start, gone when the process ends. External: any dev node whose JSON-RPC serves unlocked,
funded accounts (anvil, hardhat), for `dev --rpc-url` and the JSON-RPC tests.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, cast

import aiohttp
from eth.abc import ComputationAPI, SignedTransactionAPI, StateAPI
from eth.vm.spoof import SpoofTransaction
from eth_utils.address import to_checksum_address
from web3 import AsyncWeb3
from web3.providers import AsyncHTTPProvider
from web3.providers.eth_tester import AsyncEthereumTesterProvider
from web3.types import Wei

from ..chain import ChainClient
from ..contracts import load_artifact
from ..protocol import ContractRef

log = logging.getLogger(__name__)

GAS_ALLOWANCE_WEI = 10**18  # 1 ETH: enough gas for thousands of claims on a dev chain


def _try(state: StateAPI, transaction: SignedTransactionAPI, **overrides: int) -> ComputationAPI:
    """Run `transaction` (with `overrides` of its fields) and undo it."""
    snapshot = state.snapshot()
    try:
        return state.apply_transaction(cast(SignedTransactionAPI, SpoofTransaction(transaction, **overrides)))
    finally:
        state.revert(snapshot)


def _fits(state: StateAPI, transaction: SignedTransactionAPI, gas: int) -> bool:
    return not _try(state, transaction, gas=gas).is_error


def quick_gas_estimate(state: StateAPI, transaction: SignedTransactionAPI) -> int:
    """Gas enough for `transaction`, found in two or three executions.

    py-evm's default estimator bisects between the intrinsic gas and the block gas limit, about
    ten executions of the transaction; with every test opening channels and funding accounts,
    that was a third of the whole suite's time. A transaction never needs less than what it
    consumes when given the block limit. It may need a little more: a call forwards at most
    63/64 of the gas left, so a transaction with calls needs about 1/64 more (plus the 2300
    stipend) to leave its callees what they consume. So: that amount, then 64/63 of it, then
    doubling. The result is at most about 2% above the exact minimum (tests/test_devchain.py).
    Like py-evm's estimators, a transaction that fails even at the block limit raises its error.
    """
    computation = _try(state, transaction, gas=state.gas_limit, gas_price=0)
    if computation.is_error:
        raise computation.error
    gas = state.gas_limit - computation.get_gas_remaining()
    if _fits(state, transaction, gas):
        return gas
    gas = gas * 64 // 63 + 2300
    while gas < state.gas_limit and not _fits(state, transaction, gas):
        gas *= 2
    return min(gas, state.gas_limit)


@dataclass
class DevChain:
    w3: AsyncWeb3[Any]
    chain_id: int
    rpc_url: str | None  # None for the embedded chain
    funder: str  # an unlocked account of the node, pays for deployment and gas allowances
    token: str = ""
    contract: str = ""  # the V2 DrainChannel
    contract_v1: str = ""  # a V1 DrainChannel on the same token, served beside it

    async def _deploy(self, name: str, *args: Any) -> str:
        artifact = load_artifact(name)
        factory = self.w3.eth.contract(abi=artifact["abi"], bytecode=artifact["bytecode"])
        tx_hash = await factory.constructor(*args).transact({"from": self.funder})
        receipt = await self._mined(tx_hash)
        if receipt["status"] != 1:
            raise RuntimeError(f"deploying {name} failed")
        return str(receipt["contractAddress"])

    async def _mined(self, tx_hash: Any) -> Any:
        # web3's wait_for_transaction_receipt polls every 0.1 s; dev chains mine at once.
        return await self.w3.eth.wait_for_transaction_receipt(tx_hash, poll_latency=0.005)

    async def deploy(self) -> None:
        self.token = await self._deploy("TestUSDC")
        self.contract = await self._deploy("DrainChannel", self.token)
        self.contract_v1 = await self._deploy("DrainChannelV1", self.token)
        log.info(
            "devchain_deployed chain_id=%d token=%s contract=%s contract_v1=%s",
            self.chain_id,
            self.token,
            self.contract,
            self.contract_v1,
        )

    @property
    def contracts(self) -> tuple[ContractRef, ...]:
        """Both deployments, as a provider serves them (the V2 first)."""
        return (ContractRef(self.contract, "v2"), ContractRef(self.contract_v1, "v1"))

    async def fresh_contract(self, *, fee_bps: int = 0) -> DevChain:
        """The same chain and token with a new DrainChannel, taking `fee_bps` from each payout
        (V2's protocol fee: 200 on Amoy) for the funder."""
        chain = replace(self, contract=await self._deploy("DrainChannel", self.token))
        if fee_bps:
            call = chain.client().contract.functions.setFee(self.funder, fee_bps)
            await self._mined(await call.transact({"from": self.funder}))
        return chain

    def client(self, version: str = "v2") -> ChainClient:
        """A client of the V2 contract, or of the V1 one."""
        return ChainClient(self.w3, self.contract_v1 if version == "v1" else self.contract, version)

    def token_contract(self) -> Any:
        return self.w3.eth.contract(address=to_checksum_address(self.token), abi=load_artifact("TestUSDC")["abi"])

    async def fund(self, address: str, *, usdc: int = 0, eth_wei: int = GAS_ALLOWANCE_WEI) -> None:
        """Give `address` gas money and test USDC (the token mints to anyone)."""
        address = to_checksum_address(address)
        if eth_wei:
            tx = await self.w3.eth.send_transaction({"from": self.funder, "to": address, "value": Wei(eth_wei)})
            await self._mined(tx)
        if usdc:
            tx = await self.token_contract().functions.mint(address, usdc).transact({"from": self.funder})
            await self._mined(tx)

    async def usdc_balance(self, address: str) -> int:
        return int(await self.token_contract().functions.balanceOf(to_checksum_address(address)).call())

    async def travel(self, seconds: int) -> int:
        """Move the chain's clock forward and mine a block at the new time; returns it."""
        latest = int((await self.w3.eth.get_block("latest"))["timestamp"])
        provider = self.w3.provider
        if isinstance(provider, AsyncEthereumTesterProvider):
            provider.ethereum_tester.time_travel(latest + seconds)
        else:  # anvil and hardhat
            await provider.make_request("evm_increaseTime", [seconds])
            await provider.make_request("evm_mine", [])
        if isinstance(provider, AsyncEthereumTesterProvider):
            provider.ethereum_tester.mine_blocks(1)
        return int((await self.w3.eth.get_block("latest"))["timestamp"])

    async def close(self) -> None:
        if isinstance(self.w3.provider, AsyncHTTPProvider):
            await self.w3.provider.disconnect()


async def start_embedded_chain() -> DevChain:
    provider = AsyncEthereumTesterProvider()
    chain = provider.ethereum_tester.backend.chain
    chain.gas_estimator = quick_gas_estimate
    # And on the class: eth-tester makes a new chain object when it reverts to a snapshot.
    type(chain).gas_estimator = staticmethod(quick_gas_estimate)
    w3 = AsyncWeb3(provider)
    accounts = await w3.eth.accounts
    dev_chain = DevChain(w3=w3, chain_id=int(await w3.eth.chain_id), rpc_url=None, funder=accounts[0])
    await dev_chain.deploy()
    return dev_chain


async def attach_dev_node(rpc_url: str) -> DevChain:
    """Use a running dev node (anvil, hardhat) whose first account is unlocked and funded."""
    provider = AsyncHTTPProvider(rpc_url, request_kwargs={"timeout": aiohttp.ClientTimeout(total=30)})
    w3 = AsyncWeb3(provider)
    accounts = await w3.eth.accounts
    if not accounts:
        raise RuntimeError(f"the node at {rpc_url} has no unlocked accounts to deploy with")
    chain = DevChain(w3=w3, chain_id=int(await w3.eth.chain_id), rpc_url=rpc_url, funder=accounts[0])
    await chain.deploy()
    return chain
