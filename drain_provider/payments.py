"""The money of a paid request: PaymentGate accepts vouchers, Charge owns what follows.

`PaymentGate.accept` checks what needs no ledger state: the header's format, the channel
(memory, then the ledger, then for a channel never seen one read on each contract served, V1 and
V2, at once), the signer under the channel's own contract's EIP-712 domain (pure CPU), its
provider, consumer, deposit and expiry. The chain is read only for a new channel. A channel
within MIN_CHANNEL_TTL of its expiry (chain time) is refused: after expiry its consumer may
close it and take back whatever was not claimed. Closings are noticed by the claimer. It runs
before the request's input is counted: nothing that costs in proportion to a body is spent on a
request that does not carry a voucher for one of our channels. `PaymentGate.precheck` refuses,
on a ledger read, a voucher the reservation would surely refuse, before a large input is counted.

`Charge` is the only owner of a reservation, from the ledger transaction that makes it to the one
that ends it (docs/DESIGN.md, "Rules of money"):

    voucher = await gate.accept(header)
    async with gate.charge(voucher, plan, encoding=..., endpoint=..., model=...) as charge:
        ...call the upstream, capped at charge.output_tokens...
        await charge.committed()      # before the client is sent a byte (rule 4)
        ...relay, metering what reaches the client into charge.meter...
        charge.finish(ending, reported_usage)
    charge.settlement                 # the figures for X-DRAIN-Cost / Total / Remaining

Leaving the block decides, once, what the request costs, never more than its reservation:
    normal end          settle: the upstream's reported usage if the upstream completed, else the
                        local count of what was delivered (rule 5)
    client gone         settle what was delivered: the input and the metered output
    upstream broke off  settle what was delivered; release if no output token was (rule 5)
    server stopping     release: the shutdown is our doing, nothing is charged
    any error           release: an upstream failure before the client got a byte, or ours

PAYMENT_MODE is decided here, and only here, so that every paid endpoint built on the two
follows it: `enforce` is the above. `off`: `accept` looks at no header and returns None, and a
charge of None is free: no ledger, the upstream capped at the request's own max_tokens (or
DEFAULT_MAX_TOKENS), what is delivered still metered. `shadow`: a valid voucher is charged as in
`enforce`; a refusal (any PaymentError, from `accept`, `precheck` or the reservation) is logged
as `payment_refusal_shadowed`, counted in `PaymentGate.shadowed`, and the request is served free
as in `off`. A bad body is refused as always. What each request was (channel, model, tokens,
cost, a shadowed refusal) goes to the access log's `requestinfo.current()`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from typing import assert_never

import tiktoken

from .chain import ChainClient, ChainClock, ChainUnavailable
from .ledger import CLOSING_MESSAGE, ChannelRecord, Ledger, Refusal, Reservation, Settlement, reservation_fit
from .openai_format import Usage
from .pricing import MAX_COST, ReservationPlan, affordable_output_tokens, cost, pass_through_cost
from .protocol import (
    ChannelState,
    ContractRef,
    Domain,
    Voucher,
    VoucherFormatError,
    parse_voucher,
    recover_address,
    signature_well_formed,
    voucher_digest,
)
from .requestinfo import current
from .states import ChannelStatus, PaymentMode, StreamEnding, UsageSource, UsageStatus
from .tokens import TokenMeter
from .upstream import UpstreamError

log = logging.getLogger(__name__)


class PaymentError(Exception):
    """A refused payment; `code` is a protocol error code, the message is safe for clients."""

    def __init__(self, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.headers = headers or {}


@dataclass(frozen=True)
class KnownChannel:
    """The on-chain facts of a channel that cannot change while it is open, and the EIP-712
    domain separator of its contract (what its vouchers are signed under)."""

    consumer: bytes  # the 20-byte address, as signature recovery returns it
    provider: str
    deposit: int
    expiry: int
    separator: bytes
    contract: ContractRef


def _malformed_signature() -> PaymentError:
    return PaymentError(
        "invalid_signature", "The voucher signature is not a valid 65-byte signature (low s, v 27/28 or 0/1)."
    )


def usage_status(ending: StreamEnding) -> UsageStatus:
    """The usage row's status for each way a request can end (mypy checks none is missing)."""
    match ending:
        case StreamEnding.DONE:
            return UsageStatus.OK
        case StreamEnding.BUDGET:
            return UsageStatus.BUDGET_STOP
        case StreamEnding.CLIENT_GONE | StreamEnding.UPSTREAM_FAILED:
            return UsageStatus.PARTIAL
        case _:
            assert_never(ending)


def _refused(refusal: Refusal) -> PaymentError:
    headers = {}
    if refusal.required is not None:
        headers = {"X-DRAIN-Required": str(refusal.required), "X-DRAIN-Provided": str(refusal.provided)}
    return PaymentError(refusal.code, refusal.message, headers)


def _log_if_failed(future: asyncio.Future[Reservation | Refusal] | asyncio.Future[Settlement]) -> None:
    """Look at a ledger write's failure, so that a future nobody awaits any more (its request was
    cancelled) does not end as 'exception was never retrieved'."""
    if not future.cancelled() and future.exception() is not None:
        log.debug("ledger_write_failed error=%s", type(future.exception()).__name__)


class Charge:
    """One paid request's money; see the module docstring. Use it once, with `async with`. With
    no voucher (PAYMENT_MODE off, or a refusal shadowed) it is free: nothing reserved or settled,
    `settlement` stays None, the output is still bounded and metered."""

    def __init__(
        self,
        gate: PaymentGate,
        voucher: Voucher | None,
        plan: ReservationPlan,
        *,
        encoding: tiktoken.Encoding,
        endpoint: str,
        model: str,
    ) -> None:
        self._gate = gate
        self.voucher = voucher  # accepted by the gate; None: served free
        self.plan = plan
        self.endpoint = endpoint
        self.model = model
        self._durable: asyncio.Future[Reservation | Refusal] | None = None
        self._ending: StreamEnding | None = None
        self._reported: Usage | None = None
        self.reservation: Reservation | None = None
        self.meter = TokenMeter(encoding, 0)  # its limit is set once the reservation is known
        self.settlement: Settlement | None = None
        self._info = current()

    @property
    def paid(self) -> bool:
        """Whether the request holds a reservation (False: served free)."""
        return self.reservation is not None

    @property
    def output_tokens(self) -> int:
        """The most output tokens the reservation pays for (free: what the request asked): the
        cap for the upstream."""
        if self.reservation is None:
            return self.plan.wanted_output_tokens
        return self.reservation.output_tokens

    @property
    def reserved(self) -> int:
        """The most this request may cost (X-DRAIN-Reserved)."""
        assert self.reservation is not None
        return self.reservation.amount

    @property
    def charged(self) -> bool:
        """Whether the request, now settled, cost anything (what a stream's error event says)."""
        return self.settlement is not None and self.settlement.cost > 0

    @property
    def channel_id(self) -> str | None:
        return None if self.voucher is None else self.voucher.channel_id

    @property
    def next_min(self) -> int:
        """X-DRAIN-Next-Min: the least the next voucher may carry, for a request of this model
        with no input and MIN_OUTPUT_TOKENS of output. Careful clients add their own input's
        cost (and more output) to it and sign exactly that."""
        assert self.settlement is not None
        return self.settlement.next_min(self.plan.least_request)

    async def __aenter__(self) -> Charge:
        """Store the voucher and reserve the worst case, or raise PaymentError. Returns as soon
        as the reservation is known; its COMMIT (an fsync) may still be running."""
        if self.voucher is None:
            return self._free()
        ledger = self._gate.ledger
        info = self._info
        before_commit: asyncio.Future[Reservation | Refusal] = asyncio.get_running_loop().create_future()
        self._durable = ledger.authorize(
            self.voucher,
            self.plan,
            endpoint=self.endpoint,
            model=self.model,
            request_id=None if info is None else info.request_id,
            before_commit=before_commit,
        )
        self._durable.add_done_callback(_log_if_failed)
        try:
            outcome = await asyncio.shield(before_commit)
        except asyncio.CancelledError:
            # The client left while its voucher was being stored; the transaction completes
            # regardless, so its reservation is released as soon as it exists.
            self._durable.add_done_callback(self._release_orphan)
            raise
        if isinstance(outcome, Refusal):
            error = _refused(outcome)
            if self._gate.mode is not PaymentMode.SHADOW:
                raise error
            self._gate.shadow(error)
            self.voucher, self._durable = None, None
            return self._free()
        self.reservation = outcome
        self._gate.reservations_held += 1
        self.meter.limit = affordable_output_tokens(self.plan.price, self.reservation.amount, self.plan.input_tokens)
        return self

    def _free(self) -> Charge:
        """Served without payment: the output bounded by what the request asked, as a paid one
        whose voucher covers it all."""
        self.meter.limit = self.plan.wanted_output_tokens
        if self._info is not None:
            self._info.free = True
        return self

    def _release_orphan(self, durable: asyncio.Future[Reservation | Refusal]) -> None:
        if durable.cancelled() or durable.exception() is not None or isinstance(durable.result(), Refusal):
            return
        reservation = durable.result()
        assert isinstance(reservation, Reservation)
        self._gate.ledger.release(reservation, error="client left during authorization").add_done_callback(
            _log_if_failed
        )

    async def committed(self) -> None:
        """Wait until the voucher and the reservation are durable. Nothing may reach the client
        before; if the COMMIT failed, this raises and nothing was stored. Free: nothing to wait for."""
        if self._durable is not None:
            await self._durable

    def finish(self, ending: StreamEnding, reported: Usage | None) -> None:
        """How the request ended, and the usage the upstream reported (None if it reported none,
        or none that covers what the client got). What reached the client is in `meter`."""
        self._ending = ending
        self._reported = reported

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.reservation is None:
            self._end_free(exc)
            return
        try:
            await self._end(exc)
        finally:
            self._gate.reservations_held -= 1

    def _end_free(self, exc: BaseException | None) -> None:
        """A free request's ending, for the access log and the metrics: what it would be charged on."""
        ending = self._ending
        if ending is None and isinstance(exc, asyncio.CancelledError):
            ending = StreamEnding.CLIENT_GONE
        if ending is not None and (exc is None or ending is StreamEnding.CLIENT_GONE):
            self._note(ending, self.usage(ending), None)

    def _note(self, ending: StreamEnding, usage: Usage, charged: int | None) -> None:
        info = self._info
        if info is not None:
            info.model, info.ending, info.cost = self.model, ending, charged
            info.input_tokens, info.output_tokens = usage.input_tokens, usage.output_tokens

    async def _end(self, exc: BaseException | None) -> None:
        if exc is None and self._ending is not None:
            if self._ending is StreamEnding.UPSTREAM_FAILED and self.meter.tokens == 0:
                # Only a role chunk, or nothing, reached the client: it got none of what it paid for.
                await self._release("the upstream failed before any output")
            else:
                await self._settle(self._ending)
        elif isinstance(exc, asyncio.CancelledError):
            if self._gate.stopping.is_set():
                await self._release("interrupted by shutdown")
            else:
                await self._settle(StreamEnding.CLIENT_GONE)
        elif exc is None:
            log.error("charge_without_outcome channel=%s", self.channel_id)
            await self._release("internal error")
        elif isinstance(exc, UpstreamError):
            await self._release(exc.message)
        else:
            await self._release("internal error")

    def usage(self, ending: StreamEnding) -> Usage:
        """What the request is charged on: the upstream's report when the upstream completed and
        reported; otherwise the counted input and the output the client was sent."""
        if ending is StreamEnding.DONE and self._reported is not None:
            return self._reported
        return Usage(self.plan.input_tokens, self.meter.tokens, UsageSource.LOCAL)

    async def _settle(self, ending: StreamEnding) -> None:
        assert self.reservation is not None
        usage = self.usage(ending)
        price_cost, source = self.price_cost(usage)
        if price_cost > self.reserved:  # the ledger charges the reservation, not more (rule 3)
            log.warning(
                "charge_over_reservation channel=%s usage_id=%d reported_in=%d reported_out=%d price_cost=%d "
                "reserved=%d",
                self.channel_id,
                self.reservation.usage_id,
                usage.input_tokens,
                usage.output_tokens,
                price_cost,
                self.reserved,
            )
        self.settlement = await self._gate.ledger.settle(
            self.reservation,
            price_cost=price_cost,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            status=usage_status(ending),
            usage_source=source,
        )
        self._note(ending, usage, self.settlement.cost)
        log.info(
            "paid channel=%s model=%s ending=%s in=%d out=%d cost=%d total=%d source=%s",
            self.channel_id,
            self.model,
            ending,
            usage.input_tokens,
            usage.output_tokens,
            self.settlement.cost,
            self.settlement.total,
            source,
        )

    def price_cost(self, usage: Usage) -> tuple[int, UsageSource]:
        """What `usage` costs by the plan's billing rule, and what it was computed on: the
        per-request price; or, with a markup, the upstream's reported cost times it (when it
        reported one); or the token prices. The ledger caps it at the reservation (rule 3)."""
        if self.plan.fixed is not None:
            return self.plan.fixed, UsageSource.PER_REQUEST
        if self.plan.markup is not None and usage.cost_usd is not None:
            return pass_through_cost(usage.cost_usd, self.plan.markup), UsageSource.UPSTREAM_COST
        return min(cost(self.plan.price, usage.input_tokens, usage.output_tokens), MAX_COST), usage.source

    async def _release(self, reason: str) -> None:
        assert self.reservation is not None
        self.settlement = await self._gate.ledger.release(self.reservation, error=reason)
        if self._info is not None:
            self._info.model, self._info.cost = self.model, 0


class PaymentGate:
    """Accepts vouchers on the channels of every contract served (`chains`, one client per
    contract, the primary first): a channel is verified against its own contract's domain."""

    def __init__(
        self,
        ledger: Ledger,
        chains: Sequence[ChainClient],
        chain_id: int,
        provider_address: str,
        *,
        clock: ChainClock | None = None,
        min_channel_ttl: int = 600,
        stopping: asyncio.Event | None = None,
        mode: PaymentMode = PaymentMode.ENFORCE,
    ) -> None:
        self.ledger = ledger
        self.mode = mode
        self.shadowed: Counter[str] = Counter()  # refusals served anyway (shadow), by code
        self.reservations_held = 0  # charges in flight holding a reservation
        self.chains = tuple(chains)
        self.contracts = tuple(chain.ref for chain in self.chains)
        self.chain = self.chains[0]  # the primary's: what discovery headers name
        self.domain = Domain(chain_id, self.chain.address)
        self.provider = provider_address
        self.clock = clock or ChainClock()
        self.min_channel_ttl = min_channel_ttl
        # Set when the server begins to stop: a request cancelled after that was not left by its client.
        self.stopping = stopping or asyncio.Event()
        self._served = {
            chain.address.lower(): (chain, Domain(chain_id, chain.address), Domain(chain_id, chain.address).separator)
            for chain in self.chains
        }
        self._known: dict[str, KnownChannel] = {}
        self._fetch_locks: dict[str, asyncio.Lock] = {}

    # --- a channel's contract ---------------------------------------------------------------------

    def _served_by(self, record: ChannelRecord) -> tuple[ChainClient, Domain, bytes]:
        served = self._served.get(record.contract.lower())
        if served is None:
            raise PaymentError(
                "channel_not_found",
                f"Channel {record.channel_id} is on contract {record.contract}, which this provider no longer serves.",
            )
        return served

    def contract_of(self, record: ChannelRecord) -> ContractRef:
        """The contract a channel of the ledger lives on; PaymentError channel_not_found if that
        contract is no longer served."""
        return self._served_by(record)[0].ref

    def domain_of(self, record: ChannelRecord) -> Domain:
        """The EIP-712 domain of the channel's contract: what its vouchers, its close
        authorization and its consumer's requests are signed under."""
        return self._served_by(record)[1]

    def chain_of(self, record: ChannelRecord) -> ChainClient:
        """The client of the channel's contract (reads, claims)."""
        return self._served_by(record)[0]

    def charge(
        self, voucher: Voucher | None, plan: ReservationPlan, *, encoding: tiktoken.Encoding, endpoint: str, model: str
    ) -> Charge:
        """The charge of a request whose `voucher` was accepted (None: free), to be entered with
        `async with`."""
        return Charge(self, voucher, plan, encoding=encoding, endpoint=endpoint, model=model)

    def shadow(self, error: PaymentError) -> None:
        """PAYMENT_MODE=shadow: a refusal served anyway, logged and counted."""
        self.shadowed[error.code] += 1
        info = current()
        if info is not None:
            info.shadowed = error.code
        log.warning(
            "payment_refusal_shadowed code=%s route=%s request_id=%s",
            error.code,
            "-" if info is None else info.route,
            "-" if info is None else info.request_id,
        )

    async def precheck(self, voucher: Voucher | None, plan: ReservationPlan) -> None:
        """`_precheck`, for a voucher that pays; in shadow mode a refusal is left to the
        reservation, which refuses it again and serves the request free."""
        if voucher is None:
            return
        try:
            await self._precheck(voucher, plan)
        except PaymentError:
            if self.mode is not PaymentMode.SHADOW:
                raise

    async def _precheck(self, voucher: Voucher, plan: ReservationPlan) -> None:
        """Refuse, on one ledger read, an accepted voucher the reservation would surely refuse
        for `plan`: a nonce or amount already passed, or a headroom short of the plan's minimum.
        For a large body, before its input is counted: `plan` then holds a lower bound of the
        input, so a refusal's X-DRAIN-Required is a lower bound too (the count could only raise
        it). A stale read can only let through what the reservation then refuses."""
        channel = await self.ledger.get_channel(voucher.channel_id)
        if channel is None or channel.status is ChannelStatus.CLOSED:
            raise PaymentError("channel_not_found", f"Channel {voucher.channel_id} is closed.")
        if channel.status is ChannelStatus.CLOSING:
            raise PaymentError("channel_closing", CLOSING_MESSAGE)
        fit = reservation_fit(
            voucher,
            plan,
            last_nonce=channel.last_nonce,
            last_amount=channel.last_amount,
            in_use=channel.charged + channel.reserved,
        )
        if isinstance(fit, Refusal):
            if fit.required is not None:
                fit = replace(
                    fit,
                    message=f"This request needs a voucher for at least {fit.required} base units (cumulative; "
                    f"more once its input is counted); the voucher gives {fit.provided}.",
                )
            raise _refused(fit)

    async def accept(self, header: str | None) -> Voucher | None:
        """`_accept` as PAYMENT_MODE says. None: the request is served free (off, or a refusal
        shadowed)."""
        if self.mode is PaymentMode.OFF:
            return None
        try:
            return await self._accept(header)
        except PaymentError as exc:
            if self.mode is not PaymentMode.SHADOW:
                raise
            self.shadow(exc)
            return None

    async def _accept(self, header: str | None) -> Voucher:
        """The voucher of `header`, if it may pay on one of our channels; PaymentError if not.
        What depends on the ledger's state (nonce, amount, headroom) is checked when reserving.

        A channel already known costs a dict lookup and one signature recovery, under its own
        contract's domain. A channel not yet in memory is read from the ledger, or from every
        served contract at once (docs/DESIGN.md, rule 1)."""
        if header is None or not header.strip():
            raise PaymentError("voucher_required", "This endpoint is paid: send a signed X-DRAIN-Voucher header.")
        try:
            voucher = parse_voucher(header)
        except VoucherFormatError as exc:
            raise PaymentError("invalid_voucher_format", f"Malformed X-DRAIN-Voucher: {exc}") from None
        info = current()
        if info is not None:
            info.channel = voucher.channel_id
        channel = self._known.get(voucher.channel_id)
        if channel is None:
            if not signature_well_formed(voucher.signature):  # refused before any ledger or chain read
                raise _malformed_signature()
            channel = await self._fetch(voucher)
        self._check_expiry(voucher.channel_id, channel)
        signer = recover_address(
            voucher_digest(channel.separator, voucher.channel_id, voucher.amount, voucher.nonce), voucher.signature
        )
        if signer is None:
            raise _malformed_signature()
        if signer != channel.consumer:
            raise PaymentError(
                "invalid_signature",
                "The voucher is not signed by the channel's consumer under its contract's EIP-712 domain "
                f"(chainId {self.domain.chain_id}, contract {channel.contract.address}, {channel.contract.version}).",
            )
        if voucher.amount > channel.deposit:
            raise PaymentError(
                "exceeds_deposit", f"The voucher amount exceeds the channel deposit of {channel.deposit}."
            )
        return voucher

    async def _fetch(self, voucher: Voucher) -> KnownChannel:
        """A channel not in memory: one lookup per channel, however many requests arrive for it."""
        channel_id = voucher.channel_id
        lock = self._fetch_locks.setdefault(channel_id, asyncio.Lock())
        async with lock:
            known = self._known.get(channel_id) or await self._load(voucher)
            self._known[channel_id] = known
        self._fetch_locks.pop(channel_id, None)
        return known

    def _check_expiry(self, channel_id: str, known: KnownChannel) -> None:
        # After expiry the consumer may close the channel and take back whatever is unclaimed:
        # serve only while there is time left to claim what this request earns.
        if self.clock.now() >= known.expiry - self.min_channel_ttl:
            raise PaymentError(
                "channel_expiring",
                f"Channel {channel_id} expires at {known.expiry} (unix time, chain clock); this provider takes "
                f"no vouchers in the last {self.min_channel_ttl} s of a channel, so a channel must be opened for "
                f"more than {self.min_channel_ttl} s (duration). Open a new channel, for an hour or more.",
            )

    async def _load(self, voucher: Voucher) -> KnownChannel:
        channel_id = voucher.channel_id
        record = await self.ledger.get_channel(channel_id)
        if record is not None and record.status is ChannelStatus.CLOSED:
            raise PaymentError("channel_not_found", f"Channel {channel_id} is closed.")
        if record is not None and record.status is ChannelStatus.CLOSING:
            raise PaymentError("channel_closing", CLOSING_MESSAGE)
        if record is None:
            record = await self._sync_from_chain(channel_id, voucher)
        elif record.provider != self.provider:  # the ledger outlived a change of PROVIDER_PRIVATE_KEY
            raise PaymentError(
                "wrong_provider", f"Channel {channel_id} was opened to {record.provider}, not to {self.provider}."
            )
        chain, _, separator = self._served_by(record)
        return KnownChannel(
            bytes.fromhex(record.consumer[2:]), record.provider, record.deposit, record.expiry, separator, chain.ref
        )

    async def _read(self, chain: ChainClient, channel_id: str) -> ChannelState | None:
        """The channel as `chain`'s contract has it; None if the RPC failed."""
        try:
            return await chain.get_channel(channel_id)
        except ChainUnavailable:
            return None

    async def _sync_from_chain(self, channel_id: str, voucher: Voucher | None = None) -> ChannelRecord:
        """A channel never seen: read on every served contract at once. Ids are
        keccak(consumer, provider, timestamp, the consumer's count of channels on that contract),
        so one may exist on two contracts only for the same consumer and provider; then it is
        the one whose domain the voucher is signed under (without a voucher, none yet)."""
        states = await asyncio.gather(*(self._read(chain, channel_id) for chain in self.chains))
        found = [(chain, state) for chain, state in zip(self.chains, states, strict=True) if state and state.exists]
        if not found:
            if any(state is None for state in states):
                raise PaymentError(
                    "chain_unavailable", "The blockchain RPC is unavailable; try again shortly. You were not charged."
                )
            raise PaymentError("channel_not_found", f"Channel {channel_id} does not exist on chain (or was closed).")
        if len(found) > 1 and voucher is None:
            raise PaymentError(
                "channel_not_found",
                f"Channel {channel_id} exists on several contracts; pay one request on it first, so that its "
                "voucher tells which.",
            )
        if len(found) > 1:
            assert voucher is not None
            found = [(chain, state) for chain, state in found if self._signed_on(chain, state, voucher)]
            if not found:  # nothing stored: which contract it is stays open for a good voucher
                raise PaymentError(
                    "invalid_signature",
                    f"Channel {channel_id} exists on several contracts; the voucher is signed by its consumer "
                    "under the EIP-712 domain of none of them.",
                )
        chain, state = found[0]
        if state.provider != self.provider:
            raise PaymentError(
                "wrong_provider", f"Channel {channel_id} was opened to {state.provider}, not to {self.provider}."
            )
        log.info(
            "channel_synced channel=%s contract=%s deposit=%d expiry=%d",
            channel_id,
            chain.address,
            state.deposit,
            state.expiry,
        )
        return await self.ledger.add_channel(channel_id, state, contract=chain.address, block=self.clock.block)

    def _signed_on(self, chain: ChainClient, state: ChannelState, voucher: Voucher) -> bool:
        separator = self._served[chain.address.lower()][2]
        digest = voucher_digest(separator, voucher.channel_id, voucher.amount, voucher.nonce)
        signer = recover_address(digest, voucher.signature)
        return signer is not None and signer == bytes.fromhex(state.consumer[2:])

    async def record_of(self, channel_id: str) -> ChannelRecord:
        """The ledger's record of a channel of ours, in any state: a channel new to the ledger is
        looked up on chain and stored, as a first voucher would (PaymentError channel_not_found,
        wrong_provider or chain_unavailable if it cannot be). For the channel endpoints."""
        record = await self.ledger.get_channel(channel_id)
        if record is None:
            return await self._sync_from_chain(channel_id)
        if record.provider != self.provider:
            raise PaymentError(
                "wrong_provider", f"Channel {channel_id} was opened to {record.provider}, not to {self.provider}."
            )
        return record

    def forget(self, channel_id: str) -> None:
        """Drop a channel from the memory cache (it was closed, or its state changed on chain)."""
        self._known.pop(channel_id, None)
