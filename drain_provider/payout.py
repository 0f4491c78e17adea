"""`python -m drain_provider withdraw`: move the USDC the provider's account has been paid to
PAYOUT_ADDRESS (or `--to`), all of it unless `--amount` says less. Only the token moves: the gas
money (POL) stays in the account, which needs it for the next claims.

The transfer is signed and sent like a claim (chain.py's prepare, broadcast and receipt), from
the account's pending nonce. A server running beside it sends claims from the same account: if
one of them takes the nonce between the two, the node refuses the transfer as a used nonce and
it is signed again with the next one (up to NONCE_TRIES times). The other way round, a claim that
loses its nonce to the transfer fails and is retried by the claimer after its backoff; no money
is at stake either way, only a claim's delay.

Exit codes: 0 sent and mined; 2 a bad argument or setting (nothing sent); 1 what the chain
decides: nothing to withdraw, not enough POL for the gas (the line says how much to send), fees
above MAX_FEE_GWEI, an RPC that does not answer, a transfer that reverted or is not mined in time.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass

from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils.address import is_hex_address, to_checksum_address

from .chain import (
    ChainClient,
    ChainUnavailable,
    ContractReverted,
    FeeAboveCeiling,
    InsufficientGasFunds,
    NonceTooLow,
    PreparedTx,
)
from .config import Settings
from .gas import WEI_PER_TOKEN, format_gas
from .protocol import format_usdc, parse_usdc

log = logging.getLogger(__name__)

NONCE_TRIES = 3
# More than an ERC-20 transfer takes (USDC's: about 40,000 to 65,000): what to ask for when a node
# will not estimate the transfer for an account too poor to pay for it at its gas price.
TRANSFER_GAS_BOUND = 100_000


class WithdrawError(Exception):
    """Why nothing was sent (or what became of it); `code` is the exit code. One line, no secret."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Request:
    """What the operator asked, checked before the chain is reached."""

    to: str
    amount: int | None  # base units; None: the whole balance


def parse_request(settings: Settings, *, amount: str | None, to: str | None) -> Request:
    """The arguments and PAYOUT_ADDRESS, checked; a WithdrawError with exit code 2 if wrong."""
    if to is not None and not is_hex_address(to.strip()):
        raise WithdrawError("--to: must be a 0x-prefixed 20-byte address (40 hex digits)", 2)
    recipient = to_checksum_address(to.strip()) if to is not None else settings.payout_address
    if recipient is None:
        raise WithdrawError("no payout address: set PAYOUT_ADDRESS (in .env) or pass --to ADDRESS", 2)
    if recipient.lower() == settings.provider_address.lower():
        raise WithdrawError("the payout address is the provider's own account: nothing would move", 2)
    base_units = None
    if amount is not None:
        base_units = parse_usdc(amount.strip(), whole_digits=12)
        if base_units is None:
            raise WithdrawError("--amount: must be a decimal USDC amount with at most 6 decimals, like 2.5", 2)
        if base_units == 0:
            raise WithdrawError("--amount: must be above 0", 2)
    return Request(str(recipient), base_units)


def _pol(wei: int, *, round_up: bool = False) -> str:
    if round_up:  # what to send must be enough: up to the 6th decimal shown
        step = WEI_PER_TOKEN // 10**6
        wei = -(-wei // step) * step
    return f"{format_gas(wei)} POL"


class Withdrawal:
    """One transfer of the account's USDC, from the first balance read to the receipt."""

    def __init__(self, settings: Settings, chain: ChainClient, account: LocalAccount, token: str) -> None:
        self.settings = settings
        self.chain = chain
        self.account = account
        self.token = token

    async def plan(self, request: Request) -> tuple[int, PreparedTx]:
        """The amount to send and a transfer signed for it: refused here if the account holds
        too little USDC, or too little POL for the gas at today's fees."""
        address = self.account.address
        held = await self.chain.token_balance(self.token, address)
        if request.amount is None and held == 0:
            raise WithdrawError(f"nothing to withdraw: {address} holds 0 USDC")
        if request.amount is not None and request.amount > held:
            raise WithdrawError(f"--amount: {address} holds only {format_usdc(held)} USDC", 2)
        amount = held if request.amount is None else request.amount
        return amount, await self.prepare(request.to, amount)

    async def prepare(self, to: str, amount: int) -> PreparedTx:
        address = self.account.address
        balance = await self.chain.balance(address)
        if balance == 0:  # some nodes refuse even to estimate gas for an empty account
            raise WithdrawError(f"not enough POL for the gas: {address} holds 0 POL; send it some POL first")
        try:
            prepared = await self.chain.prepare(
                self.account,
                self.chain.transfer_call(self.token, to, amount),
                nonce=await self.chain.pending_nonce(address),
                max_fee_per_gas=self.settings.max_fee_per_gas,
            )
        except FeeAboveCeiling as exc:
            raise WithdrawError(
                f"gas fees are above MAX_FEE_GWEI ({exc.fee / 10**9:.1f} gwei per gas > {exc.ceiling // 10**9}): "
                "try later"
            ) from None
        except ContractReverted as exc:
            raise WithdrawError(f"the token refuses the transfer ({exc.error}); nothing was sent") from None
        except ChainUnavailable:
            fees = await self.chain.fees()
            bound = TRANSFER_GAS_BOUND * fees.get("maxFeePerGas", fees.get("gasPrice", 0))
            if balance < bound:
                raise self._short_of_gas(balance, bound) from None
            raise
        if balance < prepared.max_cost:
            raise self._short_of_gas(balance, prepared.max_cost)
        return prepared

    def _short_of_gas(self, balance: int, cost: int) -> WithdrawError:
        return WithdrawError(
            f"not enough POL for the gas: {self.account.address} holds {_pol(balance)}, the transfer may cost up "
            f"to {_pol(cost, round_up=True)} at current fees; send it at least {_pol(cost - balance, round_up=True)}"
        )

    async def send(self, to: str, amount: int, prepared: PreparedTx) -> PreparedTx:
        """Broadcast, signing again from the new pending nonce if a claim took this one."""
        for attempt in range(NONCE_TRIES):
            try:
                await self.chain.broadcast(prepared.raw)
                return prepared
            except NonceTooLow:
                if attempt == NONCE_TRIES - 1:
                    raise WithdrawError("the account's nonce kept being taken (a claim?): try again") from None
                log.info("withdraw_nonce_taken nonce=%d", prepared.nonce)
                prepared = await self.prepare(to, amount)
            except InsufficientGasFunds:
                raise WithdrawError("the node says the account cannot pay the gas: send it POL") from None
        raise AssertionError("unreachable")


async def withdraw(
    settings: Settings,
    chain: ChainClient,
    request: Request,
    *,
    confirm: Callable[[str], bool],
    out: Callable[[str], None] = print,
) -> int:
    """Plan, confirm (`confirm` sees the plan in one line), send and follow the transfer."""
    account: LocalAccount = Account.from_key(settings.provider_private_key)
    tokens = {await chain.for_contract(contract).usdc() for contract in settings.contracts}
    if len(tokens) != 1:
        raise WithdrawError("the contracts served take different tokens: withdraw does not know which to send", 2)
    withdrawal = Withdrawal(settings, chain, account, tokens.pop())
    amount, prepared = await withdrawal.plan(request)
    plan = (
        f"send {format_usdc(amount)} USDC ({amount} base units) of token {withdrawal.token} from {account.address} "
        f"to {request.to}; gas at most {_pol(prepared.max_cost, round_up=True)}, paid from the account's POL"
    )
    if not confirm(plan):
        out("nothing sent")
        return 1
    prepared = await withdrawal.send(request.to, amount, prepared)
    log.info("withdraw_sent to=%s amount=%d tx=%s", request.to, amount, prepared.tx_hash)
    poll = 0.05 if chain.is_embedded else 0.5
    result = await chain.wait_receipt(prepared.tx_hash, timeout=settings.claim_receipt_timeout, poll=poll)
    if result is None:
        raise WithdrawError(
            f"sent tx {prepared.tx_hash}, not mined within {settings.claim_receipt_timeout:.0f} s: "
            "look it up before withdrawing again"
        )
    if not result.succeeded:
        raise WithdrawError(f"tx {prepared.tx_hash} reverted on chain; nothing moved but its gas")
    usdc_left = await chain.token_balance(withdrawal.token, account.address)
    pol_left = await chain.balance(account.address)
    out(f"sent {format_usdc(amount)} USDC to {request.to}")
    out(f"tx {prepared.tx_hash} (block {result.block_number}, gas used {result.gas_used})")
    out(f"the account {account.address} keeps {format_usdc(usdc_left)} USDC and {_pol(pol_left)} for gas")
    return 0


def ask(plan: str) -> bool:
    """The confirmation on a terminal: the plan, then y to send."""
    print(plan, file=sys.stderr)
    try:
        return input("send? [y/N] ").strip().lower() in ("y", "yes")
    except EOFError:
        return False


async def run_withdraw(settings: Settings, *, amount: str | None, to: str | None, yes: bool) -> int:
    """The command: a bad argument before any RPC call; then the chain, checked as `claim` does."""
    from .checks import require_chain

    request = parse_request(settings, amount=amount, to=to)
    if not yes and not sys.stdin.isatty():
        raise WithdrawError("not on a terminal: pass --yes to send without being asked", 2)
    assert settings.rpc_url is not None
    primary = settings.contracts[0]
    chain = ChainClient.over_http(settings.rpc_url, primary.address, version=primary.version)
    try:
        await require_chain([chain.for_contract(contract) for contract in settings.contracts], settings)
        return await withdraw(settings, chain, request, confirm=lambda plan: yes or ask(plan))
    except ChainUnavailable as exc:
        raise WithdrawError(f"the chain RPC is unavailable: {exc}") from None
    finally:
        await chain.close()
