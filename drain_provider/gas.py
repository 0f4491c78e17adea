"""The provider account's gas, counted in claims it can pay for.

Claims are paid in the chain's gas token from the provider's own account: when it runs dry no
claim goes through, and whatever a consumer's close finds unclaimed is lost. The gauge is read
by the chain watcher at every poll (balance and the fee a claim would offer now) and told by the
claimer when a claim could not pay for its gas; /health, the start-up log and `doctor` read it.
Its level is recomputed from the last reading, so a refilled account clears the alert at the
next poll, without a restart.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from enum import StrEnum

from .chain import ChainClient

log = logging.getLogger(__name__)

# The gas limit of one claim: 131,738 measured for the first claim of a channel on DrainChannel
# with V2's fee on (103,680 without it; later claims ~70-80k), plus the claimer's 20% margin.
CLAIM_GAS = 160_000
WEI_PER_TOKEN = 10**18


class GasLevel(StrEnum):
    OK = "ok"
    LOW = "low"  # fewer claims' worth than LOW_GAS_CLAIMS
    EMPTY = "empty"  # not one claim's worth, or a claim could not pay for its gas


@dataclass
class GasGauge:
    address: str
    low_claims: int  # LOW_GAS_CLAIMS; 0: never low, only empty
    balance: int | None = None  # wei, at the last reading
    fee_per_gas: int | None = None  # wei: the max fee per gas a claim would offer at the last reading
    read_at: float | None = None
    needed: int | None = None  # wei a claim needed and the account lacked, until a reading covers it

    async def read(self, chain: ChainClient) -> None:
        """The balance and the fees now (raises ChainUnavailable)."""
        balance = await chain.balance(self.address)
        fees = await chain.fees()
        self.observe(balance, fees.get("maxFeePerGas", fees.get("gasPrice", 0)))

    def observe(self, balance: int, fee_per_gas: int) -> None:
        before = self.level
        self.balance, self.fee_per_gas, self.read_at = balance, fee_per_gas, time.time()
        if self.needed is not None and balance >= self.needed:
            self.needed = None
        self._log_change(before)

    def blocked(self, balance: int, needed: int) -> None:
        """The claimer's word: a claim needed `needed` wei and the account held `balance`."""
        before = self.level
        self.balance, self.needed = balance, max(needed, balance + 1)
        self._log_change(before)

    def cleared(self) -> None:
        """A claim was mined: the account paid for it."""
        self.needed = None

    @property
    def claim_cost(self) -> int | None:
        """What the account must hold for one claim at today's fees, in wei."""
        return None if self.fee_per_gas is None else CLAIM_GAS * self.fee_per_gas

    @property
    def claims_left(self) -> int | None:
        """How many claims the balance pays for; None when unknown or when gas is free."""
        cost = self.claim_cost
        if self.balance is None or not cost:
            return None
        return self.balance // cost

    @property
    def level(self) -> GasLevel | None:
        """None until the first reading."""
        if self.needed is not None:
            return GasLevel.EMPTY
        left = self.claims_left
        if left is None:
            return None if self.balance is None else GasLevel.OK
        if left < 1:
            return GasLevel.EMPTY
        return GasLevel.LOW if left < self.low_claims else GasLevel.OK

    def _log_change(self, before: GasLevel | None) -> None:
        """One line when the level changes (the first reading included), not one per poll."""
        after = self.level
        if after == before or (before is None and after is GasLevel.OK):
            return
        level = {GasLevel.OK: logging.INFO, GasLevel.LOW: logging.WARNING, GasLevel.EMPTY: logging.ERROR}
        log.log(
            level[after] if after else logging.INFO,
            "gas_%s address=%s balance_wei=%s claims_left=%s low_gas_claims=%d",
            after,
            self.address,
            self.balance,
            self.claims_left,
            self.low_claims,
        )


def format_gas(wei: int) -> str:
    """Wei as gas tokens (POL on Polygon), cut to 6 decimals, for people."""
    whole, fraction = divmod(wei, WEI_PER_TOKEN)
    decimals = f"{fraction * 10**6 // WEI_PER_TOKEN:06d}".rstrip("0")
    return f"{whole}.{decimals}" if decimals else str(whole)
