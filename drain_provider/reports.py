"""What the provider earned and claimed, in one JSON shape for the admin API and the CLI.

Keys are camelCase and amounts are decimal strings of base units, as everywhere clients read
money from us; times are unix seconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .chain import ChainClient, ChainUnavailable
from .claimer import Claimer, ClaimOutcome
from .config import Settings
from .ledger import ChannelRecord, ClaimRecord, Ledger
from .protocol import Voucher


def claim_json(record: ClaimRecord) -> dict[str, Any]:
    """A row of the claims table."""
    return {
        "id": record.id,
        "channelId": record.channel_id,
        "amount": str(record.amount),
        "status": record.status,
        "txHash": record.tx_hash,
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
        "consumer": record.consumer,
        "status": record.status,
        "deposit": str(record.deposit),
        "expiry": record.expiry,
        "charged": str(record.charged),
        "reserved": str(record.reserved),
        "claimed": str(record.claimed),
        "unclaimed": str(max(record.charged - record.claimed, 0)),
        "lastVoucher": {"amount": str(record.last_amount), "nonce": str(record.last_nonce)},
    }


def last_voucher_json(record: ChannelRecord, voucher: Voucher) -> dict[str, Any]:
    """A channel's last voucher, signed and ready to claim, with where the channel stands."""
    return {
        **voucher.to_json(),
        "consumer": record.consumer,
        "charged": str(record.charged),
        "claimed": str(record.claimed),
        "status": record.status,
    }


async def status_report(
    settings: Settings, ledger: Ledger, chain: ChainClient, claimer: Claimer | None
) -> dict[str, Any]:
    """Earned, claimed, unclaimed, gas: GET /v1/admin/stats and `python -m drain_provider status`."""
    totals = await ledger.totals()
    last = await ledger.claims(limit=1)
    try:
        gas: str | None = str(await chain.balance(settings.provider_address))
    except ChainUnavailable:
        gas = None
    return {
        "provider": settings.provider_address,
        "chainId": settings.chain_id,
        "contract": settings.drain_contract,
        "earned": str(totals.earned),
        "claimed": str(totals.claimed),
        "unclaimed": str(totals.unclaimed),
        "inFlight": str(totals.reserved),
        "channels": {"open": totals.open_channels, "closed": totals.closed_channels},
        "claimThreshold": str(settings.claim_threshold),
        "lastClaim": claim_json(last[0]) if last else None,
        "gasBalanceWei": gas,
        "alert": claimer.alert if claimer else None,
        "claimerLastCycleAt": claimer.last_cycle_at if claimer else None,
    }
