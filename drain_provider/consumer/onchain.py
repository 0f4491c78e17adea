"""The consumer's side of the DrainChannel contract through plain web3: approve, open, read a
channel, close it. Only the ABI fragments a client needs are here (they are the same in V1 and
V2, `cooperativeClose` aside), so a client depends on no artifact and none of the provider's
chain code: any AsyncWeb3 works, one over an RPC URL or the embedded chain of `dev` and the tests.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import aiohttp
from eth_account.signers.local import LocalAccount
from eth_utils.address import to_checksum_address
from web3 import AsyncWeb3
from web3.exceptions import ContractLogicError
from web3.logs import DISCARD
from web3.providers import AsyncHTTPProvider

from ..protocol import ChannelState

log = logging.getLogger(__name__)


def _fn(name: str, inputs: list[tuple[str, str]], outputs: list[dict[str, Any]], mutability: str) -> dict[str, Any]:
    return {
        "type": "function",
        "name": name,
        "inputs": [{"name": n, "type": t} for n, t in inputs],
        "outputs": outputs,
        "stateMutability": mutability,
    }


def _event(name: str, inputs: list[tuple[str, str, bool]]) -> dict[str, Any]:
    return {
        "type": "event",
        "name": name,
        "anonymous": False,
        "inputs": [{"name": n, "type": t, "indexed": i} for n, t, i in inputs],
    }


_UINT = [{"name": "", "type": "uint256"}]
_BOOL = [{"name": "", "type": "bool"}]

ERC20_ABI: list[dict[str, Any]] = [
    _fn("approve", [("spender", "address"), ("amount", "uint256")], _BOOL, "nonpayable"),
    _fn("allowance", [("owner", "address"), ("spender", "address")], _UINT, "view"),
    _fn("balanceOf", [("account", "address")], _UINT, "view"),
]

CHANNEL_STRUCT = {
    "name": "",
    "type": "tuple",
    "components": [
        {"name": "consumer", "type": "address"},
        {"name": "provider", "type": "address"},
        {"name": "deposit", "type": "uint256"},
        {"name": "claimed", "type": "uint256"},
        {"name": "expiry", "type": "uint256"},
    ],
}

DRAIN_CHANNEL_ABI: list[dict[str, Any]] = [
    _fn("usdc", [], [{"name": "", "type": "address"}], "view"),
    _fn(
        "open",
        [("provider", "address"), ("amount", "uint256"), ("duration", "uint256")],
        [{"name": "channelId", "type": "bytes32"}],
        "nonpayable",
    ),
    _fn("getChannel", [("channelId", "bytes32")], [CHANNEL_STRUCT], "view"),
    _fn(
        "cooperativeClose",
        [("channelId", "bytes32"), ("finalAmount", "uint256"), ("providerSignature", "bytes")],
        [],
        "nonpayable",
    ),
    _fn("close", [("channelId", "bytes32")], [], "nonpayable"),
    _event(
        "ChannelOpened",
        [
            ("channelId", "bytes32", True),
            ("consumer", "address", True),
            ("provider", "address", True),
            ("deposit", "uint256", False),
            ("expiry", "uint256", False),
        ],
    ),
    _event(
        "ChannelClosed", [("channelId", "bytes32", True), ("consumer", "address", True), ("refund", "uint256", False)]
    ),
]


class TransactionFailed(Exception):
    """A transaction of the consumer's would revert, or did. The message names the step and is
    safe to show (no URL, no key)."""


@dataclass(frozen=True)
class Opened:
    channel_id: str
    deposit: int
    expiry: int


def _revert_reason(exc: Exception) -> str:
    """What went wrong, safe to show: a revert's message (the node's words about the contract),
    else the error's type alone (a transport error's text may hold the RPC URL and its key)."""
    if isinstance(exc, ContractLogicError) or type(exc).__module__.startswith("eth_tester"):
        return str(exc).split("\n", 1)[0][:160]
    return type(exc).__name__


class ConsumerChain:
    """One consumer's key and one DrainChannel contract on one chain."""

    def __init__(
        self, w3: AsyncWeb3[Any], contract: str, account: LocalAccount, *, owns_provider: bool = False
    ) -> None:
        self.w3 = w3
        self.account = account
        self.contract = w3.eth.contract(address=to_checksum_address(contract), abi=DRAIN_CHANNEL_ABI)
        self._owns_provider = owns_provider

    @classmethod
    def connect(cls, w3_or_url: AsyncWeb3[Any] | str, contract: str, account: LocalAccount) -> ConsumerChain:
        """Over the given AsyncWeb3, or a new one over the JSON-RPC URL (closed by `close`)."""
        if isinstance(w3_or_url, str):
            provider = AsyncHTTPProvider(w3_or_url, request_kwargs={"timeout": aiohttp.ClientTimeout(total=60)})
            return cls(AsyncWeb3(provider), contract, account, owns_provider=True)
        return cls(w3_or_url, contract, account)

    @property
    def address(self) -> str:
        return str(self.contract.address)

    async def close(self) -> None:
        if self._owns_provider and isinstance(self.w3.provider, AsyncHTTPProvider):
            await self.w3.provider.disconnect()

    async def chain_id(self) -> int:
        return int(await self.w3.eth.chain_id)

    async def token(self) -> str:
        """The channel's token: the contract's `usdc()`."""
        return str(to_checksum_address(await self.contract.functions.usdc().call()))

    def _erc20(self, token: str) -> Any:
        return self.w3.eth.contract(address=to_checksum_address(token), abi=ERC20_ABI)

    async def balance(self, token: str) -> int:
        return int(await self._erc20(token).functions.balanceOf(self.account.address).call())

    async def channel(self, channel_id: str) -> ChannelState:
        consumer, provider, deposit, claimed, expiry = await self.contract.functions.getChannel(
            bytes.fromhex(channel_id[2:])
        ).call()
        return ChannelState(
            to_checksum_address(consumer), to_checksum_address(provider), int(deposit), int(claimed), int(expiry)
        )

    async def open(self, provider: str, deposit: int, duration: int, *, token: str | None = None) -> Opened:
        """approve (only if the allowance is short) + open; the channel id is read from the
        receipt's ChannelOpened event."""
        token = token or await self.token()
        erc20 = self._erc20(token)
        have = await self.balance(token)
        if have < deposit:
            raise TransactionFailed(f"the consumer holds {have} base units of the token, the deposit is {deposit}")
        allowance = int(await erc20.functions.allowance(self.account.address, self.address).call())
        if allowance < deposit:
            await self._send("approve", erc20.functions.approve(self.address, deposit))
        receipt = await self._send(
            "open", self.contract.functions.open(to_checksum_address(provider), deposit, duration)
        )
        for event in self.contract.events.ChannelOpened().process_receipt(receipt, errors=DISCARD):
            if event["args"]["consumer"] == self.account.address:
                args = event["args"]
                return Opened("0x" + bytes(args["channelId"]).hex(), int(args["deposit"]), int(args["expiry"]))
        raise TransactionFailed("open: no ChannelOpened event in the receipt")

    async def cooperative_close(self, channel_id: str, final_amount: int, signature: bytes) -> int:
        """cooperativeClose with the provider's CloseAuthorization; the refund paid back."""
        call = self.contract.functions.cooperativeClose(bytes.fromhex(channel_id[2:]), final_amount, signature)
        return self._refund(await self._send("cooperativeClose", call))

    async def close_expired(self, channel_id: str) -> int:
        """close after expiry (no provider needed); the refund paid back."""
        return self._refund(await self._send("close", self.contract.functions.close(bytes.fromhex(channel_id[2:]))))

    def _refund(self, receipt: Any) -> int:
        events = self.contract.events.ChannelClosed().process_receipt(receipt, errors=DISCARD)
        return sum(int(e["args"]["refund"]) for e in events)

    async def _fees(self) -> dict[str, int]:
        """EIP-1559 fields where the chain has a base fee (twice it, plus the tip), else a gas price."""
        block = await self.w3.eth.get_block("latest")
        base_fee = block.get("baseFeePerGas")
        if base_fee is None:
            return {"gasPrice": int(await self.w3.eth.gas_price)}
        try:
            tip = int(await self.w3.eth.max_priority_fee)
        except Exception:  # nodes without eth_maxPriorityFeePerGas: a common minimum
            tip = 10**9
        return {"maxFeePerGas": 2 * int(base_fee) + tip, "maxPriorityFeePerGas": tip}

    async def _send(self, step: str, call: Any) -> Any:
        """Estimate (a revert is refused here, before anything is signed), sign with the
        consumer's key, send, and wait for the receipt."""
        sender = self.account.address
        try:
            gas = int(await call.estimate_gas({"from": sender}))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the node's revert, in whichever form it comes
            raise TransactionFailed(f"{step} would revert ({_revert_reason(exc)})") from None
        nonce = await self.w3.eth.get_transaction_count(sender, "pending")
        tx = await call.build_transaction({"from": sender, "nonce": nonce, "gas": gas * 6 // 5, **await self._fees()})
        signed = self.account.sign_transaction(tx)
        tx_hash = "0x" + bytes(signed.hash).hex()
        poll = 0.5 if isinstance(self.w3.provider, AsyncHTTPProvider) else 0.005
        try:
            await self.w3.eth.send_raw_transaction(signed.raw_transaction)
            receipt = await self.w3.eth.wait_for_transaction_receipt(signed.hash, timeout=180, poll_latency=poll)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # no gas money, a node that refuses it, not mined in time
            raise TransactionFailed(f"{step} failed ({_revert_reason(exc)}; transaction {tx_hash})") from None
        if receipt["status"] != 1:
            raise TransactionFailed(f"{step} reverted (transaction {tx_hash})")
        log.info("consumer_tx step=%s tx=%s gas_used=%d", step, tx_hash, receipt["gasUsed"])
        return receipt
