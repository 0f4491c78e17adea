"""The DrainChannel contract as seen through web3's AsyncWeb3.

`ChainClient` is the only place that talks JSON-RPC. Whatever goes wrong underneath (connection
refused, timeout, malformed answer, no contract at the address) becomes a `ChainUnavailable`, so
the API can answer 503 `chain_unavailable` instead of a misleading 402.
"""

from __future__ import annotations

import ast
import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from eth_account.signers.local import LocalAccount
from eth_hash.auto import keccak
from eth_tester.exceptions import TransactionFailed
from eth_utils.address import to_checksum_address
from web3 import AsyncWeb3
from web3.exceptions import ContractLogicError
from web3.providers import AsyncHTTPProvider

from .contracts import load_artifact
from .protocol import ChannelState, Voucher

log = logging.getLogger(__name__)


class ChainUnavailable(Exception):
    """The RPC could not answer. The message is safe to log (it never holds a URL)."""


class ContractReverted(Exception):
    """A call or transaction reverted; `error` is the custom error's name when it has one."""

    def __init__(self, error: str) -> None:
        super().__init__(error)
        self.error = error


@dataclass(frozen=True)
class TxResult:
    tx_hash: str
    succeeded: bool
    block_number: int
    gas_used: int
    receipt: Any = field(repr=False, compare=False)


def revert_data(exc: BaseException) -> bytes | None:
    """The raw revert data of a failed call or transaction.

    A JSON-RPC node (anvil, geth, Polygon) gives web3 a ContractLogicError whose `data` is the
    0x-hex revert data; the embedded eth-tester chain raises its own TransactionFailed with the
    bytes' repr in the message ("execution reverted: b'...'"), parsed back here.
    """
    if isinstance(exc, ContractLogicError):
        data = exc.data
        if isinstance(data, str) and data.startswith("0x"):
            try:
                return bytes.fromhex(data[2:])
            except ValueError:
                return None
        return None
    if isinstance(exc, TransactionFailed) and exc.args:
        message = str(exc.args[0])
        prefix = "execution reverted: "
        if message.startswith(prefix):
            try:
                value = ast.literal_eval(message[len(prefix) :])
            except (ValueError, SyntaxError):
                return None
            return value if isinstance(value, bytes) else None
    return None


def _error_selectors(abi: list[dict[str, Any]]) -> dict[str, str]:
    selectors = {}
    for item in abi:
        if item.get("type") == "error":
            signature = f"{item['name']}({','.join(i['type'] for i in item['inputs'])})"
            selectors["0x" + keccak(signature.encode())[:4].hex()] = item["name"]
    return selectors


class ChainClient:
    def __init__(self, w3: AsyncWeb3[Any], contract_address: str) -> None:
        self.w3 = w3
        abi = load_artifact("DrainChannel")["abi"]
        self.contract = w3.eth.contract(address=to_checksum_address(contract_address), abi=abi)
        self._errors = _error_selectors(abi)

    @classmethod
    def over_http(cls, rpc_url: str, contract_address: str, *, timeout: float = 10.0) -> ChainClient:
        provider = AsyncHTTPProvider(
            rpc_url,
            request_kwargs={"timeout": aiohttp.ClientTimeout(total=timeout)},
            exception_retry_configuration=None,
            cache_allowed_requests=True,  # eth_chainId once, not before every call
        )
        return cls(AsyncWeb3(provider), contract_address)

    @property
    def address(self) -> str:
        return str(self.contract.address)

    async def close(self) -> None:
        if isinstance(self.w3.provider, AsyncHTTPProvider):
            await self.w3.provider.disconnect()

    def revert_name(self, exc: BaseException) -> str:
        """The contract's custom error name (InvalidAmount, ...) of a revert, if it has one."""
        data = revert_data(exc)
        if data is not None and "0x" + data[:4].hex() in self._errors:
            return self._errors["0x" + data[:4].hex()]
        return "reverted"

    async def _rpc(self, what: str, awaitable: Any) -> Any:
        try:
            return await awaitable
        except (ContractLogicError, TransactionFailed) as exc:
            raise ContractReverted(self.revert_name(exc)) from None
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any transport or decoding failure of the RPC
            log.warning("chain_rpc_failed what=%s error=%s", what, type(exc).__name__)
            raise ChainUnavailable(f"{what} failed: {type(exc).__name__}") from None

    async def chain_id(self) -> int:
        return int(await self._rpc("eth_chainId", self.w3.eth.chain_id))

    async def get_channel(self, channel_id: str) -> ChannelState:
        raw = await self._rpc("getChannel", self.contract.functions.getChannel(bytes.fromhex(channel_id[2:])).call())
        consumer, provider, deposit, claimed, expiry = raw
        return ChannelState(
            consumer=to_checksum_address(consumer),
            provider=to_checksum_address(provider),
            deposit=int(deposit),
            claimed=int(claimed),
            expiry=int(expiry),
        )

    async def latest_timestamp(self) -> int:
        block = await self._rpc("eth_getBlockByNumber", self.w3.eth.get_block("latest"))
        return int(block["timestamp"])

    async def send(self, account: LocalAccount, call: Any, *, gas_margin_percent: int = 20) -> TxResult:
        """Sign `call` with `account` locally, send it and wait for the receipt.

        A revert during gas estimation raises ContractReverted before anything is sent."""
        sender = account.address
        gas = await self._rpc("eth_estimateGas", call.estimate_gas({"from": sender}))
        nonce = await self._rpc("eth_getTransactionCount", self.w3.eth.get_transaction_count(sender, "pending"))
        tx = await self._rpc(
            "build_transaction",
            call.build_transaction({"from": sender, "nonce": nonce, "gas": gas * (100 + gas_margin_percent) // 100}),
        )
        signed = account.sign_transaction(tx)
        tx_hash = await self._rpc("eth_sendRawTransaction", self.w3.eth.send_raw_transaction(signed.raw_transaction))
        receipt = await self._rpc("eth_getTransactionReceipt", self.w3.eth.wait_for_transaction_receipt(tx_hash))
        return TxResult(
            tx_hash="0x" + bytes(tx_hash).hex(),
            succeeded=receipt["status"] == 1,
            block_number=int(receipt["blockNumber"]),
            gas_used=int(receipt["gasUsed"]),
            receipt=receipt,
        )

    async def claim(self, account: LocalAccount, voucher: Voucher) -> TxResult:
        call = self.contract.functions.claim(
            bytes.fromhex(voucher.channel_id[2:]), voucher.amount, voucher.nonce, voucher.signature
        )
        result = await self.send(account, call)
        log.info(
            "claim_sent channel=%s amount=%d tx=%s ok=%s",
            voucher.channel_id,
            voucher.amount,
            result.tx_hash,
            result.succeeded,
        )
        return result
