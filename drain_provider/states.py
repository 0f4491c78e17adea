"""The states a request, a claim and the ledger can be in, as enums.

They live together, importing nothing, so that every module that stores, reports or decides on
a state names it the same way, and mypy checks that every stream ending maps to a usage status
(see `payments.usage_status`). The values are what the ledger stores and the APIs show.
"""

from __future__ import annotations

from enum import StrEnum


class UsageStatus(StrEnum):
    """A paid request's row in the `usage` table."""

    RESERVED = "reserved"  # in flight: its worst case is held against the voucher
    OK = "ok"  # finished normally, charged on the reported (or counted) usage
    BUDGET_STOP = "budget_stop"  # a stream or a JSON answer cut where the reservation ran out
    PARTIAL = "partial"  # the client left, or the upstream broke off: charged what was delivered
    FAILED = "failed"  # nothing billable happened: released, charged nothing
    ABANDONED = "abandoned"  # in flight when its instance died: released at a start or by a reaping


class UsageSource(StrEnum):
    """Where a request's token counts came from, or what else its charge was computed on."""

    UPSTREAM = "upstream"  # the upstream's `usage` object
    LOCAL = "local"  # counted here with tiktoken
    # How a request was charged when not on its token counts at list price:
    UPSTREAM_COST = "upstream_cost"  # pass-through: the upstream's reported `usage.cost` times the markup
    PER_REQUEST = "per_request"  # a per-request price (images): counts are not what it is charged on


class StreamEnding(StrEnum):
    """How a relayed stream ended."""

    DONE = "done"  # the upstream finished ([DONE])
    BUDGET = "budget"  # the next event (or a JSON answer) would pass what the reservation pays for
    CLIENT_GONE = "client_gone"  # a write to the client failed
    UPSTREAM_FAILED = "upstream_failed"  # the upstream broke off or sent an error event


class ClaimStatus(StrEnum):
    """A claim's row in the `claims` table, and a claim attempt's outcome."""

    PENDING = "pending"  # in flight: at most one per channel
    CONFIRMED = "confirmed"  # mined and successful
    REVERTED = "reverted"  # the contract refused it
    FAILED = "failed"  # never reached the chain, or its nonce went to another transaction
    HELD = "held"  # not sent: its gas would have cost more than it brings (retried later)
    SKIPPED = "skipped"  # an outcome only: another claim of the channel was in flight


class ChannelStatus(StrEnum):
    """A channel in the ledger. `closing` is open on chain, but a close was asked for
    (POST /v1/close-channel): it takes no more vouchers, and its claims wait for its final window."""

    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class CloseKind(StrEnum):
    """How a channel closed on chain, as its ChannelClosed transaction shows."""

    EXPIRED = "expired"  # the consumer's close() after expiry: refunded whatever was unclaimed
    COOPERATIVE = "cooperative"  # cooperativeClose() with a provider-signed final amount
    UNKNOWN = "unknown"  # found closed, but its ChannelClosed event was not found


class SyncMode(StrEnum):
    """SQLite's `synchronous` for the ledger (LEDGER_SYNC)."""

    FULL = "FULL"  # a committed voucher survives a power cut
    NORMAL = "NORMAL"  # it survives a process crash; the last commits may not survive a power cut


class PaymentMode(StrEnum):
    """What a paid endpoint does with payment (PAYMENT_MODE): a rollout starts with `shadow`."""

    ENFORCE = "enforce"  # no valid voucher, no answer (402)
    SHADOW = "shadow"  # a valid voucher is charged; a refused payment is logged and served free
    OFF = "off"  # no voucher is looked at: everything is free (private use)


class LogFormat(StrEnum):
    """How log lines are written (LOG_FORMAT)."""

    TEXT = "text"  # `time level=... logger=... event key=value ...`
    JSON = "json"  # one JSON object per line
