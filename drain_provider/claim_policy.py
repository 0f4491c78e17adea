"""When a channel is claimed, and whether a claim is worth its gas. Pure: tested without a chain.

Each channel is claimed at most (docs/DESIGN.md, "Claim policy"):
- when its unclaimed earnings reach CLAIM_THRESHOLD, if the claim brings more than its gas costs;
- once at the end: after the MIN_CHANNEL_TTL cut-off the provider takes no more vouchers for
  the channel, so once the requests in flight have settled, one claim takes everything, before
  the consumer may close it at expiry. That claim is made whatever its gas.

A channel whose consumer asked for a cooperative close (`closing`) is claimed only in its final
window, even when forced: until then the consumer may close it with the final amount we signed,
which pays us everything earned, and a claim of a voucher above that amount would make the
close revert.
"""

from __future__ import annotations

from enum import StrEnum

from .ledger import ClaimTarget

# After the cut-off, how long a request that passed the gate just before it may still take to
# store its reservation: the final claim waits this long for them to show.
FINAL_CLAIM_GRACE = 5.0
WEI_PER_TOKEN = 10**18


class ClaimReason(StrEnum):
    THRESHOLD = "threshold"
    FINAL = "final"
    FORCED = "forced"  # asked for: `claim --force`, POST /v1/admin/claim?force=1


def in_final_window(target: ClaimTarget, *, now: float, min_channel_ttl: int) -> bool:
    """Whether the channel is past its voucher cut-off (chain time `now`): its last claim's time."""
    return now >= target.expiry - min_channel_ttl


def claim_reason(
    target: ClaimTarget, *, now: float, threshold: int, min_channel_ttl: int, force: bool = False
) -> ClaimReason | None:
    """Why `target` is claimed now (chain time `now`), or None if it is not. `force` claims any
    channel with earnings, but a closing one only in its final window."""
    if target.unclaimed <= 0:
        return None
    cutoff = target.expiry - min_channel_ttl
    if now < cutoff:
        if target.closing:
            return None
        if force:
            return ClaimReason.FORCED
        return ClaimReason.THRESHOLD if target.unclaimed >= threshold else None
    if force:
        return ClaimReason.FORCED
    settled = target.reserved == 0 and now >= cutoff + FINAL_CLAIM_GRACE
    # Requests still in flight halfway to expiry: claim what has settled rather than risk it all.
    late = now >= target.expiry - min_channel_ttl // 2
    return ClaimReason.FINAL if settled or late else None


def gas_in_usdc(gas_wei: int, gas_token_price: int) -> int:
    """Gas in USDC base units, rounded up; `gas_token_price` is base units per whole gas token."""
    return -(-gas_wei * gas_token_price // WEI_PER_TOKEN)


def worth_its_gas(*, payout: int, fee_bps: int, gas_wei: int, gas_token_price: int) -> bool:
    """Whether a claim paying `payout` (before the protocol fee) brings more than its gas."""
    received = payout - payout * fee_bps // 10_000
    return received > gas_in_usdc(gas_wei, gas_token_price)
