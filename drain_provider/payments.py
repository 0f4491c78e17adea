"""PaymentGate: the rules of money for one request, from voucher header to settlement.

authorize: parse the voucher, recover its signer (pure CPU), find the channel (memory, then
ledger, then chain), check it belongs to us and to the signer, then let the ledger store the
voucher and reserve the worst case in one transaction. The reservation is known as soon as
that transaction has run; its COMMIT (an fsync) then overlaps the upstream call, and the API
waits for it before the client is sent anything. settle/release: charge what the usage costs
(never past the voucher) and free the reservation, exactly once.

The chain is read only for a channel we have not seen. A channel within MIN_CHANNEL_TTL of its
expiry (chain time) is refused: after expiry its consumer may close it and take back whatever
was not claimed. Closings are noticed by the claimer, which re-reads channels it has earnings on.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from .chain import ChainClient, ChainClock, ChainUnavailable
from .ledger import ChannelRecord, InsufficientFunds, Ledger, Rejected, Reservation, Settlement
from .pricing import ReservationPlan
from .protocol import Domain, Voucher, VoucherFormatError, parse_voucher, recover_address, voucher_digest

log = logging.getLogger(__name__)


class PaymentError(Exception):
    """A refused payment; `code` is a protocol error code, the message is safe for clients."""

    def __init__(self, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.headers = headers or {}


@dataclass(frozen=True)
class Authorization:
    """An accepted voucher and its reservation. `durable` resolves when the transaction that
    stored them is committed: the upstream may be called before that, the client may be sent
    nothing before it (DESIGN rule 4). If it fails, nothing was stored."""

    voucher: Voucher
    reservation: Reservation
    durable: asyncio.Future[Reservation]


@dataclass(frozen=True)
class KnownChannel:
    """The on-chain facts of a channel that cannot change while it is open."""

    consumer: bytes  # the 20-byte address, as signature recovery returns it
    provider: str
    deposit: int
    expiry: int


def _retrieve(future: asyncio.Future[Reservation]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.debug("authorization_not_stored error=%s", type(future.exception()).__name__)


class PaymentGate:
    def __init__(
        self,
        ledger: Ledger,
        chain: ChainClient,
        domain: Domain,
        provider_address: str,
        *,
        clock: ChainClock | None = None,
        min_channel_ttl: int = 600,
    ) -> None:
        self.ledger = ledger
        self.chain = chain
        self.domain = domain
        self.provider = provider_address
        self.clock = clock or ChainClock()
        self.min_channel_ttl = min_channel_ttl
        self._separator = domain.separator
        self._known: dict[str, KnownChannel] = {}
        self._fetch_locks: dict[str, asyncio.Lock] = {}
        self._background: set[asyncio.Future[Settlement]] = set()

    async def authorize(self, header: str | None, plan: ReservationPlan, *, endpoint: str, model: str) -> Authorization:
        if header is None or not header.strip():
            raise PaymentError("voucher_required", "This endpoint is paid: send a signed X-DRAIN-Voucher header.")
        try:
            voucher = parse_voucher(header)
        except VoucherFormatError as exc:
            raise PaymentError("invalid_voucher_format", f"Malformed X-DRAIN-Voucher: {exc}") from None
        signer = recover_address(
            voucher_digest(self._separator, voucher.channel_id, voucher.amount, voucher.nonce), voucher.signature
        )
        if signer is None:
            raise PaymentError("invalid_signature", "The voucher signature is not a valid 65-byte low-s signature.")
        channel = await self._channel(voucher.channel_id)
        if signer != channel.consumer:
            raise PaymentError(
                "invalid_signature",
                "The voucher is not signed by the channel's consumer under this provider's EIP-712 domain "
                f"(chainId {self.domain.chain_id}, contract {self.domain.verifying_contract}).",
            )
        if voucher.amount > channel.deposit:
            raise PaymentError(
                "exceeds_deposit", f"The voucher amount exceeds the channel deposit of {channel.deposit}."
            )
        ran: asyncio.Future[Reservation] = asyncio.get_running_loop().create_future()
        durable = self.ledger.authorize(voucher, plan, endpoint=endpoint, model=model, ran=ran)
        durable.add_done_callback(_retrieve)  # whoever stops waiting for it, its failure is seen
        try:
            reservation = await asyncio.shield(ran)
        except asyncio.CancelledError:
            # The client left while its voucher was being stored; the transaction completes
            # regardless, so its reservation is released as soon as it exists.
            durable.add_done_callback(self._release_orphan)
            raise
        except Rejected as exc:
            headers = {}
            if isinstance(exc, InsufficientFunds):
                headers = {"X-DRAIN-Required": str(exc.required), "X-DRAIN-Provided": str(exc.provided)}
            raise PaymentError(exc.code, exc.message, headers) from None
        return Authorization(voucher, reservation, durable)

    def _release_orphan(self, task: asyncio.Future[Reservation]) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        release = asyncio.ensure_future(self.ledger.release(task.result(), error="client left during authorization"))
        self._background.add(release)
        release.add_done_callback(self._background.discard)

    async def settle(
        self,
        reservation: Reservation,
        *,
        price_cost: int,
        input_tokens: int,
        output_tokens: int,
        status: str = "ok",
        usage_source: str = "upstream",
    ) -> Settlement:
        # The ledger books it even if this request is cancelled while waiting.
        return await self.ledger.settle(
            reservation,
            price_cost=price_cost,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            status=status,
            usage_source=usage_source,
        )

    async def release(self, reservation: Reservation, error: str) -> None:
        """Free a reservation without charging (done even if this request is cancelled)."""
        await self.ledger.release(reservation, error=error)

    async def _channel(self, channel_id: str) -> KnownChannel:
        known = self._known.get(channel_id)
        if known is None:
            # One chain read per unknown channel, however many requests arrive for it at once.
            lock = self._fetch_locks.setdefault(channel_id, asyncio.Lock())
            async with lock:
                known = self._known.get(channel_id) or await self._load(channel_id)
                self._known[channel_id] = known
            self._fetch_locks.pop(channel_id, None)
        # After expiry the consumer may close the channel and take back whatever is unclaimed:
        # serve only while there is time left to claim what this request earns.
        if self.clock.now() >= known.expiry - self.min_channel_ttl:
            raise PaymentError(
                "channel_expiring",
                f"Channel {channel_id} expires at {known.expiry} (unix time); this provider takes no vouchers "
                f"within {self.min_channel_ttl} s of expiry. Open a new channel.",
            )
        return known

    async def _load(self, channel_id: str) -> KnownChannel:
        record = await self.ledger.get_channel(channel_id)
        if record is not None and record.status != "open":
            raise PaymentError("channel_not_found", f"Channel {channel_id} is closed.")
        if record is None:
            record = await self._sync_from_chain(channel_id)
        return KnownChannel(bytes.fromhex(record.consumer[2:]), record.provider, record.deposit, record.expiry)

    async def _sync_from_chain(self, channel_id: str) -> ChannelRecord:
        try:
            state = await self.chain.get_channel(channel_id)
        except ChainUnavailable:
            raise PaymentError(
                "chain_unavailable", "The blockchain RPC is unavailable; try again shortly. You were not charged."
            ) from None
        if not state.exists:
            raise PaymentError("channel_not_found", f"Channel {channel_id} does not exist on chain (or was closed).")
        if state.provider != self.provider:
            raise PaymentError(
                "wrong_provider", f"Channel {channel_id} was opened to {state.provider}, not to {self.provider}."
            )
        log.info("channel_synced channel=%s deposit=%d expiry=%d", channel_id, state.deposit, state.expiry)
        return await self.ledger.upsert_channel(channel_id, state)

    def forget(self, channel_id: str) -> None:
        """Drop a channel from the memory cache (it was closed, or its state changed on chain)."""
        self._known.pop(channel_id, None)
