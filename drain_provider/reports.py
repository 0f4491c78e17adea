"""What the provider earned and claimed, in one JSON shape for the admin API, the CLI and /health.

Keys are camelCase; times are unix seconds. An amount of the books is an object with its base
units as a decimal string (exact, what programs read) and its USDC rendering (what people read):
`{"baseUnits": "2205", "usdc": "0.002205"}`. The books use the words of ledger.Totals: earned
(charged), claimed (paid by the chain, gross), fee (the V2 protocol fee taken from that),
received (claimed - fee), creditTaken (claimed beyond the charge), unclaimed, lost (unclaimable
after a close).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .chain import ChainClient, ChainUnavailable
from .chainwatch import ChainWatcher
from .claimer import Claimer, ClaimOutcome
from .config import Settings
from .ledger import ChannelRecord, ClaimRecord, Ledger, Totals
from .protocol import Voucher, format_usdc


def money(base_units: int) -> dict[str, str]:
    return {"baseUnits": str(base_units), "usdc": format_usdc(base_units)}


def books_json(
    *, earned: int, claimed: int, fee: int, credit_taken: int, unclaimed: int, lost: int
) -> dict[str, dict[str, str]]:
    """One channel's books, or all channels'."""
    return {
        "earned": money(earned),
        "claimed": money(claimed),
        "fee": money(fee),
        "received": money(claimed - fee),
        "creditTaken": money(credit_taken),
        "unclaimed": money(unclaimed),
        "lost": money(lost),
    }


def totals_json(totals: Totals, fee_bps: int | None) -> dict[str, Any]:
    """The provider's books, as the admin API, the CLI and /health all show them."""
    return {
        **books_json(
            earned=totals.earned,
            claimed=totals.claimed,
            fee=totals.fee,
            credit_taken=totals.credit_taken,
            unclaimed=totals.unclaimed,
            lost=totals.lost,
        ),
        "inFlight": money(totals.reserved),
        "overReservation": {
            "requests": totals.over_reservation_requests,
            "notCharged": money(totals.over_reservation_amount),
        },
        "feeBps": fee_bps,
        "channels": {
            "open": totals.open_channels,
            "closing": totals.closing_channels,
            "closed": totals.closed_channels,
        },
    }


def claim_json(record: ClaimRecord) -> dict[str, Any]:
    """A row of the claims table."""
    return {
        "id": record.id,
        "channelId": record.channel_id,
        "amount": str(record.amount),
        "status": record.status,
        "txHash": record.tx_hash,
        "payout": None if record.payout is None else str(record.payout),
        "fee": None if record.fee is None else str(record.fee),
        "error": record.error,
        "createdAt": record.created_at,
        "updatedAt": record.updated_at,
    }


def outcome_json(outcome: ClaimOutcome) -> dict[str, Any]:
    """What one claim attempt of a cycle came to."""
    return {
        "channelId": outcome.channel_id,
        "amount": str(outcome.amount),
        "status": outcome.status,
        "txHash": outcome.tx_hash,
        "error": outcome.error,
    }


def cycle_report(outcomes: Sequence[ClaimOutcome], *, force: bool, alert: str | None) -> dict[str, Any]:
    """A claim cycle run on demand: POST /v1/admin/claim and `python -m drain_provider claim`."""
    return {"force": force, "claims": [outcome_json(o) for o in outcomes], "alert": alert}


def channel_json(record: ChannelRecord) -> dict[str, Any]:
    return {
        "channelId": record.channel_id,
        "contract": record.contract,
        "consumer": record.consumer,
        "status": record.status,
        "deposit": str(record.deposit),
        "expiry": record.expiry,
        "charged": str(record.charged),
        "reserved": str(record.reserved),
        "claimed": str(record.claimed),
        "closeKind": record.close_kind,
        "books": books_json(
            earned=record.charged,
            claimed=record.claimed,
            fee=record.fee,
            credit_taken=record.credit_taken,
            unclaimed=record.unclaimed,
            lost=record.lost,
        ),
        "lastVoucher": {"amount": str(record.last_amount), "nonce": str(record.last_nonce)},
    }


def last_voucher_json(record: ChannelRecord, voucher: Voucher) -> dict[str, Any]:
    """A channel's last voucher, signed and ready to claim, with where the channel stands."""
    return {
        **voucher.to_json(),
        "contract": record.contract,  # where it is claimed
        "consumer": record.consumer,
        "charged": str(record.charged),
        "claimed": str(record.claimed),
        "status": record.status,
    }


async def status_report(
    settings: Settings, ledger: Ledger, chain: ChainClient, claimer: Claimer | None, watcher: ChainWatcher
) -> dict[str, Any]:
    """The books, the last claim, gas: GET /v1/admin/stats and `python -m drain_provider status`."""
    last = await ledger.claims(limit=1)
    fee_bps: int | None
    try:
        gas: str | None = str(await chain.balance(settings.provider_address))
        fee_bps = watcher.fee_bps if watcher.fee_bps is not None else await chain.fee_bps()
    except ChainUnavailable:
        gas, fee_bps = None, watcher.fee_bps
    return {
        "provider": settings.provider_address,
        "chainId": settings.chain_id,
        "contract": settings.drain_contract,
        "books": totals_json(await ledger.totals(), fee_bps),
        "claimThreshold": money(settings.claim_threshold),
        "lastClaim": claim_json(last[0]) if last else None,
        "gasBalanceWei": gas,
        "alert": claimer.alert if claimer else None,
        "claimerLastCycleAt": claimer.last_cycle_at if claimer else None,
    }
