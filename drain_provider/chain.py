"""The DrainChannel contract as seen through web3's AsyncWeb3.

`ChainClient` is the only place that talks JSON-RPC. Whatever goes wrong underneath (connection
refused, timeout, malformed answer, no contract at the address) becomes a `ChainUnavailable`, so
the API can answer 503 `chain_unavailable` instead of a misleading 402.
"""

from __future__ import annotations

import ast
import asyncio
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from eth_account.signers.local import LocalAccount
from eth_utils.address import to_checksum_address
from web3 import AsyncWeb3
from web3.exceptions import ContractLogicError, TransactionNotFound
from web3.logs import DISCARD
from web3.providers import AsyncHTTPProvider
from web3.providers.eth_tester import AsyncEthereumTesterProvider

from .contracts import load_artifact
from .protocol import ChannelClose, ChannelState, ClaimPaid, ContractRef, Voucher, keccak

log = logging.getLogger(__name__)


class ChainUnavailable(Exception):
    """The RPC could not answer. The message is safe to log (it never holds a URL)."""


class ContractReverted(Exception):
    """A call or transaction reverted; `error` is the custom error's name when it has one."""

    def __init__(self, error: str) -> None:
        super().__init__(error)
        self.error = error


class FeeAboveCeiling(Exception):
    def __init__(self, fee: int, ceiling: int) -> None:
        super().__init__(f"fee per gas {fee} is above the ceiling {ceiling}")
        self.fee = fee
        self.ceiling = ceiling


class NonceTooLow(Exception):
    """The account nonce of a transaction was already used, or a pending transaction holds it."""


class InsufficientGasFunds(Exception):
    """The provider account cannot pay for gas."""


@dataclass(frozen=True)
class PreparedTx:
    raw: bytes = field(repr=False)
    tx_hash: str
    nonce: int
    max_cost: int  # wei: gas limit x max fee per gas, what the account must hold
    expected_cost: int  # wei: estimated gas x the fee per gas paid at today's base fee


@dataclass(frozen=True)
class TxResult:
    tx_hash: str
    succeeded: bool
    block_number: int
    gas_used: int
    receipt: Any = field(repr=False, compare=False)


# The two ERC-20 functions `withdraw` needs, whatever token a contract takes deposits in.
_ERC20_ABI: list[dict[str, Any]] = [
    {
        "type": "function",
        "name": "balanceOf",
        "stateMutability": "view",
        "inputs": [{"name": "owner", "type": "address"}],
        "outputs": [{"name": "", "type": "uint256"}],
    },
    {
        "type": "function",
        "name": "transfer",
        "stateMutability": "nonpayable",
        "inputs": [{"name": "to", "type": "address"}, {"name": "amount", "type": "uint256"}],
        "outputs": [{"name": "", "type": "bool"}],
    },
]


def _is_embedded_revert(exc: BaseException) -> bool:
    """eth-tester's TransactionFailed, recognised without importing eth-tester (and py-evm's
    validation modules with it, 0.3 s at start-up) into a server that talks JSON-RPC."""
    return type(exc).__name__ == "TransactionFailed" and type(exc).__module__.startswith("eth_tester")


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
    if _is_embedded_revert(exc) and exc.args:
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


class ChainClock:
    """The chain's time, without an RPC call: wall time plus the offset last seen.

    Expiry is chain time. On a live chain the two agree within seconds; on a dev chain whose
    clock was moved forward they do not, so the chain watcher calls `sync` every few seconds.
    The offset never shrinks and is never negative, so the clock runs behind neither wall time
    nor the latest block read: reading "now" too early would let a channel run closer to its
    expiry than allowed; too late only refuses a little early. `block` is the
    latest block number seen (None before the first sync).
    """

    def __init__(self) -> None:
        self.offset = 0.0
        self.block: int | None = None

    def now(self) -> float:
        return time.time() + self.offset

    def observe(self, block: int, timestamp: int) -> None:
        self.block = max(block, self.block or 0)
        # Never backwards: between blocks, an idle chain's latest timestamp falls behind.
        self.offset = max(self.offset, timestamp - time.time())

    async def sync(self, chain: ChainClient) -> None:
        self.observe(*await chain.head())


class ChainClient:
    """One DrainChannel deployment (`version` "v1" or "v2") through a web3 connection. A provider
    that serves several deployments has a client per contract, all on one connection
    (`for_contract`): V1's functions and events are V2's with the same signatures, so every
    client reads through V2's ABI, and `version` says what the contract has (V1: no fee)."""

    def __init__(
        self, w3: AsyncWeb3[Any], contract_address: str, version: str = "v2", rpc_errors: Counter[str] | None = None
    ) -> None:
        self.w3 = w3
        self.version = version
        # RPC calls that failed, by call: one count for every client on this connection (metrics).
        self.rpc_errors: Counter[str] = Counter() if rpc_errors is None else rpc_errors
        abi = load_artifact("DrainChannel")["abi"]
        self.contract = w3.eth.contract(address=to_checksum_address(contract_address), abi=abi)
        self._errors = _error_selectors(abi)
        self._closed_topic = "0x" + keccak(b"ChannelClosed(bytes32,address,uint256)").hex()
        self._close_selector = keccak(b"close(bytes32)")[:4]
        self._cooperative_selector = keccak(b"cooperativeClose(bytes32,uint256,bytes)")[:4]
        self._usdc: str | None = None

    @classmethod
    def over_http(
        cls, rpc_url: str, contract_address: str, *, version: str = "v2", timeout: float = 10.0
    ) -> ChainClient:
        provider = AsyncHTTPProvider(
            rpc_url,
            request_kwargs={"timeout": aiohttp.ClientTimeout(total=timeout)},
            exception_retry_configuration=None,
            cache_allowed_requests=True,  # eth_chainId once, not before every call
        )
        return cls(AsyncWeb3(provider), contract_address, version)

    def for_contract(self, ref: ContractRef) -> ChainClient:
        """A client of another contract on this client's connection (no new session)."""
        if ref.address.lower() == self.address.lower() and ref.version == self.version:
            return self
        return ChainClient(self.w3, ref.address, ref.version, self.rpc_errors)

    @property
    def address(self) -> str:
        return str(self.contract.address)

    @property
    def ref(self) -> ContractRef:
        return ContractRef(self.address, self.version)

    @property
    def is_embedded(self) -> bool:
        """The in-process eth-tester chain: mined at once, so polling can be quick."""
        return isinstance(self.w3.provider, AsyncEthereumTesterProvider)

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
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a revert, or any transport or decoding failure of the RPC
            if isinstance(exc, ContractLogicError) or _is_embedded_revert(exc):
                raise ContractReverted(self.revert_name(exc)) from None
            log.warning("chain_rpc_failed what=%s error=%s", what, type(exc).__name__)
            self.rpc_errors[what] += 1
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

    async def head(self) -> tuple[int, int]:
        """The latest block's number and timestamp."""
        block = await self._rpc("eth_getBlockByNumber", self.w3.eth.get_block("latest"))
        return int(block["number"]), int(block["timestamp"])

    async def has_code(self) -> bool:
        """Whether anything is deployed at the contract's address: without it every call of it
        fails like an RPC that is down, so the server checks it once at start."""
        code = await self._rpc("eth_getCode", self.w3.eth.get_code(self.contract.address))
        return len(bytes(code)) > 0

    async def looks_like_v2(self) -> bool:
        """Whether the contract answers V2's `feeBps()` (V1 has no such function)."""
        try:
            await self._rpc("feeBps", self.contract.functions.feeBps().call())
        except ContractReverted:
            return False
        return True

    async def usdc(self) -> str:
        """The token the contract takes deposits in (its `usdc()`), read once: /v1/docs names it,
        and a flood of docs requests must not become a flood of RPC calls. Only the owner's
        setUSDC changes it, which a restart then picks up."""
        if self._usdc is None:
            self._usdc = to_checksum_address(await self._rpc("usdc", self.contract.functions.usdc().call()))
        return self._usdc

    def _token(self, token: str) -> Any:
        return self.w3.eth.contract(address=to_checksum_address(token), abi=_ERC20_ABI)

    async def token_balance(self, token: str, owner: str) -> int:
        """What `owner` holds of the ERC-20 `token` (base units)."""
        call = self._token(token).functions.balanceOf(to_checksum_address(owner)).call()
        return int(await self._rpc("balanceOf", call))

    def transfer_call(self, token: str, to: str, amount: int) -> Any:
        """An ERC-20 transfer of `amount` base units of `token` to `to`, for `prepare`."""
        return self._token(token).functions.transfer(to_checksum_address(to), amount)

    async def fee_bps(self) -> int:
        """The protocol fee in basis points (V2); 0 for a contract without one (V1)."""
        if self.version == "v1":
            return 0
        try:
            return int(await self._rpc("feeBps", self.contract.functions.feeBps().call()))
        except ContractReverted:
            return 0

    def claim_paid(self, receipt: Any, channel_id: str | None = None) -> ClaimPaid:
        """What a mined transaction paid the provider (of one channel, or all), from its
        receipt's ChannelClaimed and FeePaid events."""

        def total(event: Any) -> int:
            found = event().process_receipt(receipt, errors=DISCARD)
            return sum(
                int(e["args"]["amount"])
                for e in found
                if channel_id is None or "0x" + bytes(e["args"]["channelId"]).hex() == channel_id
            )

        events = self.contract.events
        return ClaimPaid(payout=total(events.ChannelClaimed), fee=total(events.FeePaid))

    async def close_logs(
        self, from_block: int, to_block: int, channel_id: str | None = None, *, contracts: Sequence[str] = ()
    ) -> list[Any]:
        """The ChannelClosed logs in a block range, of one channel or of all, emitted by this
        contract or by all of `contracts` (V1 and V2 log the same event): one eth_getLogs."""
        topics: list[Any] = [self._closed_topic]
        if channel_id is not None:
            topics.append(channel_id)
        address: Any = [to_checksum_address(a) for a in contracts] if contracts else self.contract.address
        query = {"address": address, "fromBlock": from_block, "toBlock": to_block, "topics": topics}
        return list(await self._rpc("eth_getLogs", self.w3.eth.get_logs(query)))  # type: ignore[arg-type]

    @staticmethod
    def closed_channel(log_entry: Any) -> str:
        """The channel id a ChannelClosed log is about (its first indexed topic)."""
        return "0x" + bytes(log_entry["topics"][1]).hex()

    @staticmethod
    def log_contract(log_entry: Any) -> str:
        """The contract that emitted a log, EIP-55."""
        return str(to_checksum_address(log_entry["address"]))

    async def close_of(self, log_entry: Any) -> ChannelClose:
        """A ChannelClosed log with what its transaction paid the provider: two RPC calls, so
        only for the logs of our own channels."""
        event = self.contract.events.ChannelClosed().process_log(log_entry)
        channel = self.closed_channel(log_entry)
        tx_hash = "0x" + bytes(log_entry["transactionHash"]).hex()
        receipt = await self._rpc("eth_getTransactionReceipt", self.w3.eth.get_transaction_receipt(tx_hash))  # type: ignore[arg-type]
        tx = await self._rpc("eth_getTransactionByHash", self.w3.eth.get_transaction(tx_hash))  # type: ignore[arg-type]
        paid = self.claim_paid(receipt, channel)
        selector = bytes(tx["input"])[:4]
        # A close sent through a contract wallet has another selector: a payout shows cooperation.
        cooperative = selector == self._cooperative_selector or (selector != self._close_selector and paid.payout > 0)
        return ChannelClose(
            channel_id=channel,
            refund=int(event["args"]["refund"]),
            payout=paid.payout,
            fee=paid.fee,
            cooperative=cooperative,
            tx_hash=tx_hash,
            block_number=int(log_entry["blockNumber"]),
        )

    async def balance(self, address: str) -> int:
        return int(await self._rpc("eth_getBalance", self.w3.eth.get_balance(to_checksum_address(address))))

    async def pending_nonce(self, address: str) -> int:
        count = self.w3.eth.get_transaction_count(to_checksum_address(address), "pending")
        return int(await self._rpc("eth_getTransactionCount", count))

    async def fees(self) -> dict[str, int]:
        """EIP-1559 fee fields where the chain has a base fee, a legacy gas price where not."""
        block = await self._rpc("eth_getBlockByNumber", self.w3.eth.get_block("latest"))
        base_fee = block.get("baseFeePerGas")
        if base_fee is None:
            return {"gasPrice": int(await self._rpc("eth_gasPrice", self.w3.eth.gas_price))}
        try:
            tip = int(await self._rpc("eth_maxPriorityFeePerGas", self.w3.eth.max_priority_fee))
        except ChainUnavailable:  # nodes without the method: a common minimum
            tip = 10**9
        # Twice the base fee: room for six full blocks of base-fee increases before it is stuck.
        return {"maxFeePerGas": 2 * int(base_fee) + tip, "maxPriorityFeePerGas": tip}

    async def prepare(
        self,
        account: LocalAccount,
        call: Any,
        *,
        nonce: int,
        max_fee_per_gas: int | None = None,
        gas_margin_percent: int = 20,
    ) -> PreparedTx:
        """Estimate, price and sign a transaction; nothing is sent.

        A call that would revert raises ContractReverted here, before anything is signed; fees
        above `max_fee_per_gas` raise FeeAboveCeiling."""
        sender = account.address
        gas = int(await self._rpc("eth_estimateGas", call.estimate_gas({"from": sender})))
        fees = await self.fees()
        fee_per_gas = fees.get("maxFeePerGas", fees.get("gasPrice", 0))
        # maxFeePerGas is twice the base fee plus the tip: what is paid today is the base fee plus the tip.
        paid_per_gas = fees.get("gasPrice", (fees.get("maxFeePerGas", 0) + fees.get("maxPriorityFeePerGas", 0)) // 2)
        if max_fee_per_gas is not None and fee_per_gas > max_fee_per_gas:
            raise FeeAboveCeiling(fee_per_gas, max_fee_per_gas)
        gas_limit = gas * (100 + gas_margin_percent) // 100
        tx = await self._rpc(
            "build_transaction", call.build_transaction({"from": sender, "nonce": nonce, "gas": gas_limit, **fees})
        )
        signed = account.sign_transaction(tx)
        return PreparedTx(
            raw=bytes(signed.raw_transaction),
            tx_hash="0x" + bytes(signed.hash).hex(),
            nonce=nonce,
            max_cost=gas_limit * fee_per_gas,
            expected_cost=gas * paid_per_gas,
        )

    async def broadcast(self, raw: bytes) -> None:
        """Send a signed transaction. Sending one the node already has is not an error (so a
        pending claim can be re-sent after a restart); a used nonce or an empty gas account is."""
        try:
            await self.w3.eth.send_raw_transaction(raw)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            message = str(exc).lower()
            if "already known" in message or "known transaction" in message or "already imported" in message:
                return
            if "nonce too low" in message or ("nonce" in message and "low" in message):
                raise NonceTooLow(str(exc)[:200]) from None
            if "replacement transaction underpriced" in message:  # another transaction holds the nonce
                raise NonceTooLow(str(exc)[:200]) from None
            if "insufficient funds" in message:
                raise InsufficientGasFunds(str(exc)[:200]) from None
            log.warning("chain_rpc_failed what=eth_sendRawTransaction error=%s", type(exc).__name__)
            self.rpc_errors["eth_sendRawTransaction"] += 1
            raise ChainUnavailable(f"eth_sendRawTransaction failed: {type(exc).__name__}") from None

    async def receipt(self, tx_hash: str) -> TxResult | None:
        """The receipt of a mined transaction, None while it is not mined (or unknown)."""
        try:
            receipt = await self.w3.eth.get_transaction_receipt(tx_hash)  # type: ignore[arg-type]
        except TransactionNotFound:
            return None
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("chain_rpc_failed what=eth_getTransactionReceipt error=%s", type(exc).__name__)
            self.rpc_errors["eth_getTransactionReceipt"] += 1
            raise ChainUnavailable(f"eth_getTransactionReceipt failed: {type(exc).__name__}") from None
        if receipt is None:
            return None
        return TxResult(
            tx_hash=tx_hash,
            succeeded=receipt["status"] == 1,
            block_number=int(receipt["blockNumber"]),
            gas_used=int(receipt["gasUsed"]),
            receipt=receipt,
        )

    # The deadline gives an answer (None), not a cancellation: hence a parameter, not asyncio.timeout.
    async def wait_receipt(
        self,
        tx_hash: str,
        *,
        timeout: float = 120.0,  # noqa: ASYNC109
        poll: float = 1.0,
    ) -> TxResult | None:
        """Poll for the receipt; None if the transaction is not mined within `timeout`."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            result = await self.receipt(tx_hash)
            if result is not None or asyncio.get_running_loop().time() >= deadline:
                return result
            await asyncio.sleep(poll)

    async def send(self, account: LocalAccount, call: Any) -> TxResult:
        """Sign, send and wait: for the consumer's approve/open and for tests. The provider's
        claims go through the claimer, which records each step in the ledger."""
        prepared = await self.prepare(account, call, nonce=await self.pending_nonce(account.address))
        await self.broadcast(prepared.raw)
        result = await self.wait_receipt(prepared.tx_hash, poll=0.05)
        if result is None:
            raise ChainUnavailable(f"transaction {prepared.tx_hash} was not mined in time")
        return result

    def claim_call(self, voucher: Voucher) -> Any:
        return self.contract.functions.claim(
            bytes.fromhex(voucher.channel_id[2:]), voucher.amount, voucher.nonce, voucher.signature
        )

    async def claim(self, account: LocalAccount, voucher: Voucher) -> TxResult:
        """Claim one voucher now (tests and one-off use; the claimer is the provider's way)."""
        return await self.send(account, self.claim_call(voucher))
