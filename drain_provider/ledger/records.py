"""What the ledger holds and answers, whatever the engine: the records, the refusals, and the
pure rules both engines decide by (reservation_fit, settle_figures). Amounts are integer base
units; nonces may use the whole uint256 range (stored as decimal text).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from eth_utils.address import is_hex_address, to_checksum_address

from ..pricing import ReservationPlan
from ..protocol import Voucher
from ..states import ChannelStatus, ClaimStatus, CloseKind, UsageStatus

# A row as either engine's driver gives it (sqlite3.Row, asyncpg.Record): read by column name.
Row = Any

INT64_MAX = 2**63 - 1
CLOSING_MESSAGE = (
    "A cooperative close was asked for on this channel: it takes no more vouchers. POST /v1/close-channel "
    "gives the final amount and the provider's signature for cooperativeClose; open a new channel to continue."
)

# Numbered migrations: the schema is version len(MIGRATIONS). Never edit one that has shipped;


class LedgerMismatch(Exception):
    """The ledger was made for another chain or contract, or holds earnings on a contract no
    longer served: its vouchers would be worthless here, or those earnings unclaimed."""


def check_binding(
    where: str,
    found: dict[str, str],
    unclaimed: Sequence[tuple[str, int, int]],
    *,
    chain_id: str,
    served: Sequence[str],
    fix: str,
) -> None:
    """The binding rule of `Ledger.bind`, on what the ledger holds (`found`: its chain_id and
    contract; `unclaimed`: (contract, channels, amount) of open channels holding earnings not yet
    claimed): LedgerMismatch unless the chain is this one and the bound contract, and every
    contract holding earnings, is among those `served`. `fix` says what to change."""
    served_lower = {c.lower() for c in served}
    bound = (found.get("chain_id"), found.get("contract"))
    if bound[0] != chain_id or bound[1] not in served_lower:
        raise LedgerMismatch(
            f"the ledger {where} belongs to chain {bound[0]} contract {shown_address(bound[1])}, "
            f"not chain {chain_id} contract {', '.join(str(shown_address(c)) for c in served)}: {fix}"
        )
    for address, count, amount in unclaimed:
        if address.lower() not in served_lower:
            raise LedgerMismatch(
                f"the ledger {where} holds {count} open channel(s) with {amount} base units unclaimed on "
                f"contract {address}, which is not served: serve it until they are claimed"
            )


@dataclass(frozen=True)
class Refusal:
    """The ledger refused a voucher; `code` is a protocol error code. A value, not an exception:
    a refusal inside a group commit must not make the writer run the whole batch again."""

    code: str
    message: str
    required: int | None = None  # insufficient_funds: the cumulative amount needed
    provided: int | None = None

    @classmethod
    def insufficient(cls, required: int, provided: int) -> Refusal:
        return Refusal(
            "insufficient_funds",
            f"This request needs a voucher for {required} base units (cumulative); the voucher gives {provided}.",
            required,
            provided,
        )


@dataclass(frozen=True)
class ChannelRecord:
    channel_id: str
    consumer: str
    provider: str
    deposit: int
    claimed: int  # on chain, at the last sync
    expiry: int
    status: ChannelStatus
    charged: int  # the sum of settled costs
    reserved: int  # the sum of in-flight reservations
    last_amount: int  # of the last accepted voucher
    last_nonce: int
    synced_at: float  # when the on-chain fields were read
    fee: int = 0  # the protocol fee taken from what the chain paid us (V2)
    close_kind: CloseKind | None = None
    contract: str = ""  # EIP-55: the DrainChannel deployment the channel lives on
    close_amount: int | None = None  # the final amount of the close authorization we signed
    close_signature: str | None = None  # its signature, 0x-hex

    @property
    def unclaimed(self) -> int:
        """Earned and still claimable (0 once closed: then it is lost)."""
        return max(self.charged - self.claimed, 0) if self.status is not ChannelStatus.CLOSED else 0

    @property
    def lost(self) -> int:
        """Earned, never paid, and no longer claimable: the channel closed first."""
        return max(self.charged - self.claimed, 0) if self.status is ChannelStatus.CLOSED else 0

    @property
    def credit_taken(self) -> int:
        """Claimed beyond what was charged: a claim had to use a voucher above the charge."""
        return max(self.claimed - self.charged, 0)

    @classmethod
    def from_row(cls, row: Row) -> ChannelRecord:
        return cls(
            channel_id=row["channel_id"],
            consumer=row["consumer"],
            provider=row["provider"],
            deposit=row["deposit"],
            claimed=row["claimed"],
            expiry=row["expiry"],
            status=ChannelStatus(row["status"]),
            charged=row["charged"],
            reserved=row["reserved"],
            last_amount=row["last_amount"],
            last_nonce=int(row["last_nonce"]),
            synced_at=row["synced_at"],
            fee=row["fee"],
            close_kind=CloseKind(row["close_kind"]) if row["close_kind"] else None,
            contract=row["contract"],
            close_amount=row["close_amount"],
            close_signature=row["close_signature"],
        )


CHANNEL_COLUMNS = (
    "channel_id, consumer, provider, deposit, claimed, expiry, status, charged, reserved, last_amount, last_nonce, "
    "synced_at, fee, close_kind, contract, close_amount, close_signature"
)


def as_dict(row: Row) -> dict[str, Any]:
    return {key: row[key] for key in row.keys()}  # noqa: SIM118 (a Row iterates over its values)


def voucher_from_row(row: Row) -> Voucher:
    """A voucher from a vouchers row (nonce as decimal text, signature as 0x-hex)."""
    return Voucher(row["channel_id"], row["amount"], int(row["nonce"]), bytes.fromhex(row["signature"][2:]))


def reservation_fit(
    voucher: Voucher, plan: ReservationPlan, *, last_nonce: int, last_amount: int, in_use: int
) -> tuple[int, int] | Refusal:
    """What `voucher` may reserve for `plan` on an open channel whose last voucher and charged
    plus reserved total (`in_use`) are these: (amount, output tokens), or why not. The checks that
    race (docs/DESIGN.md, rule 1): inside `authorize`'s transaction they decide; outside, on a
    read (`PaymentGate.precheck`), they can only refuse early what it would refuse."""
    if voucher.nonce <= last_nonce:
        return Refusal("invalid_nonce", f"The voucher nonce must be above {last_nonce}, the last accepted nonce.")
    if voucher.amount < last_amount:
        return Refusal(
            "invalid_amount", f"The voucher amount must be at least {last_amount}, the last accepted amount."
        )
    fit = plan.fit(voucher.amount - in_use)
    if fit is None:
        return Refusal.insufficient(required=in_use + plan.worst_case, provided=voucher.amount)
    return fit


@dataclass(frozen=True)
class Reservation:
    usage_id: int
    channel_id: str
    amount: int
    output_tokens: int  # the most output tokens the reservation pays for


@dataclass(frozen=True)
class Settlement:
    cost: int  # charged for this request
    total: int  # channel's charged total after it
    remaining: int  # deposit - total
    price_cost: int  # what the usage costs at list price (cost is lower if it passed the reservation)
    last_amount: int = 0  # the channel's last accepted voucher, after it
    in_flight: int = 0  # the channel's other reservations, after it

    def next_min(self, minimal_cost: int) -> int:
        """X-DRAIN-Next-Min: the least cumulative amount the next voucher may carry for a request
        that costs at most `minimal_cost` (amounts never go down; the headroom must cover it)."""
        return max(self.last_amount, self.total + self.in_flight + minimal_cost)


def settle_figures(
    price_cost: int, *, own: int, deposit: int, charged: int, reserved: int, last_amount: int
) -> tuple[Settlement, bool]:
    """What settling a reservation of `own` for a usage costing `price_cost` charges, on a channel
    with these figures (`reserved` includes `own`): capped by the reservation (what the request
    was allowed to cost when its voucher was accepted) and by the last voucher (the charged total
    never passes it). Also whether the voucher, not the reservation, was the cap (logged)."""
    in_flight = reserved - own
    voucher_cap = max(last_amount - charged - in_flight, 0)
    cost = min(price_cost, own, voucher_cap)
    total = charged + cost
    settled = Settlement(cost, total, deposit - total, price_cost, last_amount, in_flight)
    return settled, cost < min(price_cost, own)


@dataclass(frozen=True)
class ClaimTarget:
    """A channel with earnings to claim, and the voucher to claim them with (docs/DESIGN.md,
    rule 7: the smallest stored voucher that covers the charged total and is above what the
    chain has)."""

    channel_id: str
    expiry: int
    charged: int
    claimed: int  # on chain, at the last sync
    reserved: int  # held by requests in flight
    voucher_id: int
    voucher: Voucher
    contract: str = ""  # EIP-55: where the claim is sent
    closing: bool = False  # a close was asked for: its claim waits for the final window

    @property
    def unclaimed(self) -> int:
        return self.charged - self.claimed


@dataclass(frozen=True)
class ClaimRecord:
    id: int
    channel_id: str
    amount: int
    status: ClaimStatus
    tx_hash: str | None
    tx_nonce: int | None
    raw_tx: str | None
    error: str | None
    created_at: float
    updated_at: float
    payout: int | None = None  # what the chain paid, from the receipt, once confirmed
    fee: int | None = None

    @classmethod
    def pending(cls, claim_id: int, channel_id: str, amount: int) -> ClaimRecord:
        """A claim just begun: nothing signed or sent yet."""
        now = time.time()
        return cls(claim_id, channel_id, amount, ClaimStatus.PENDING, None, None, None, None, now, now)

    @classmethod
    def from_row(cls, row: Row) -> ClaimRecord:
        return cls(**{**as_dict(row), "status": ClaimStatus(row["status"])})


@dataclass(frozen=True)
class CloseAuthorization:
    """The provider-signed CloseAuthorization of a closing channel, as stored (docs/PROTOCOL.md,
    "Cooperative close"): repeated requests get these same figures."""

    final_amount: int
    signature: str  # 0x + 65 bytes of hex


@dataclass(frozen=True)
class CloseFigures:
    """What a closing channel's final amount is decided on, as its transaction reads them."""

    deposit: int
    charged: int
    claimed: int  # the ledger's, at the last sync
    claiming: int  # the amount of a claim of ours still in flight (0: none)


@dataclass(frozen=True)
class UsageItem:
    """One paid request of a channel, as GET /v1/channels/{id}/usage shows it."""

    id: int
    created_at: int  # unix seconds
    endpoint: str
    model: str
    status: UsageStatus
    input_tokens: int
    output_tokens: int
    cost: int
    nonce: int  # of the voucher that paid for it
    voucher_amount: int


@dataclass(frozen=True)
class UsageFilter:
    """Which paid requests a usage listing shows (GET /v1/admin/usage, `usage`): newest first,
    `limit` of them, with ids below `before` (the previous page's last id)."""

    limit: int = 100
    before: int | None = None
    channel: str | None = None
    model: str | None = None
    since: int | None = None  # unix seconds, started at or after
    until: int | None = None  # unix seconds, started before


@dataclass(frozen=True)
class UsageRecord:
    """One row of the usage table, as the operator's listings show it."""

    id: int
    started_at: float
    finished_at: float | None
    channel_id: str
    endpoint: str
    model: str
    status: str
    input_tokens: int
    output_tokens: int
    reserved: int
    cost: int
    price_cost: int
    request_id: str | None

    @classmethod
    def from_row(cls, row: Row) -> UsageRecord:
        return cls(**{name: row[name] for name in _USAGE_FIELDS})


_USAGE_FIELDS = tuple(UsageRecord.__dataclass_fields__)


def usage_query(wanted: UsageFilter, *, with_request_id: bool = True) -> tuple[str, tuple[Any, ...]]:
    """The SELECT of a usage listing and its parameters, for the server's reader and for a
    read-only connection of the CLI alike. `with_request_id` False: a ledger from before
    migration 6 (the CLI may read one the server has not migrated yet)."""
    where = ["id < ?"]
    params: list[Any] = [INT64_MAX if wanted.before is None else wanted.before]
    for clause, value in (
        ("channel_id = ?", wanted.channel),
        ("model = ?", wanted.model),
        ("started_at >= ?", wanted.since),
        ("started_at < ?", wanted.until),
    ):
        if value is not None:
            where.append(clause)
            params.append(value)
    columns = ", ".join(_USAGE_FIELDS if with_request_id else (*_USAGE_FIELDS[:-1], "NULL AS request_id"))
    sql = f"SELECT {columns} FROM usage WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ?"
    return sql, (*params, wanted.limit)


@dataclass(frozen=True)
class Totals:
    """The ledger's sums over all channels, in base units (the words: ChannelRecord)."""

    earned: int  # charged to consumers
    claimed: int  # paid out by the chain, before the protocol fee
    fee: int  # the protocol fee taken from those payouts
    credit_taken: int  # claimed beyond what was charged
    unclaimed: int  # earned, still claimable
    lost: int  # earned, unclaimable: the channel closed first
    reserved: int  # held by requests in flight
    open_channels: int
    closing_channels: int
    closed_channels: int
    over_reservation_requests: int  # requests whose upstream usage cost more than they had reserved
    over_reservation_amount: int  # what those requests were not charged beyond their reservation

    @property
    def received(self) -> int:
        """What reached the provider's account."""
        return self.claimed - self.fee


CLAIM_COLUMNS = "id, channel_id, amount, status, tx_hash, tx_nonce, raw_tx, error, created_at, updated_at, payout, fee"


def shown_address(address: str | None) -> str | None:
    """An address as it is printed (EIP-55, as every address we show): the ledger keeps its
    binding in lower case."""
    return str(to_checksum_address(address)) if address is not None and is_hex_address(address) else address
