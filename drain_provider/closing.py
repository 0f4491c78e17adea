"""Cooperative close: the provider's signed final amount for a channel whose consumer is leaving.

V2's `cooperativeClose(channelId, finalAmount, providerSignature)` may be called by the consumer
at any time: it pays the provider finalAmount − claimed (less the protocol fee), refunds the rest
and deletes the channel. The consumer asks for the signature with POST /v1/close-channel. Once it
is signed, every request served on the channel would be unpaid, so (docs/PROTOCOL.md,
"Cooperative close"):

1. the channel is marked `closing` in the ledger, durably, before anything else: from that
   commit on `Ledger.authorize` refuses its vouchers (`channel_closing`), whatever the gate's
   memory says;
2. the requests already in flight are waited for (at most `wait` seconds; then 503
   `close_pending`, the channel stays closing and a repeat finishes the close);
3. finalAmount = the most the chain may hold when the consumer closes: max(charged, claimed on
   chain, read now (the ledger's figure if the RPC fails), a claim of ours still in flight)
   (`final_amount`); signed and stored in one ledger transaction. Repeats get the stored one.

The claimer holds back a closing channel's claims until its final window (claim_policy.py): a
claim above finalAmount would make the consumer's cooperativeClose revert. The close itself is
booked by the chain watcher when ChannelClosed lands.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from .chain import ChainUnavailable
from .ledger import ChannelRecord, CloseAuthorization, CloseFigures
from .payments import PaymentError, PaymentGate
from .protocol import Domain, close_authorization_digest, sign_digest
from .states import ChannelStatus

log = logging.getLogger(__name__)

CLOSE_WAIT = 10.0  # seconds a close waits for requests in flight: under the MCP server's 15 s timeout
CLOSE_RETRY_AFTER = 5  # seconds a client is told to wait before asking again (close_pending)


def final_amount(figures: CloseFigures, chain_claimed: int) -> int:
    """What the provider signs: never less than it earned (the charged total), nor than the chain
    holds or may hold by then (claimed, as read now or last, and a claim in flight), since
    cooperativeClose reverts below the claimed total; never above the deposit."""
    return min(max(figures.charged, figures.claimed, chain_claimed, figures.claiming), figures.deposit)


def sign_close_authorization(private_key: bytes, domain: Domain, channel_id: str, amount: int) -> str:
    """The provider's EIP-712 CloseAuthorization(channelId, finalAmount), 0x-hex, v in {27, 28}."""
    digest = close_authorization_digest(domain.separator, channel_id, amount)
    return "0x" + sign_digest(private_key, digest).hex()


@dataclass(frozen=True)
class SignedClose:
    """The answer to a close request."""

    channel_id: str
    authorization: CloseAuthorization
    contract: str  # EIP-55
    chain_id: int


class Closer:
    def __init__(self, gate: PaymentGate, private_key: bytes, *, wait: float = CLOSE_WAIT, poll: float = 0.02) -> None:
        self.gate = gate
        self._key = private_key
        self.wait = wait  # tests shorten it
        self.poll = poll

    async def close(self, record: ChannelRecord) -> SignedClose:
        """The close authorization of a channel of ours (`record`, from PaymentGate.record_of), or
        PaymentError: close_not_supported (V1), channel_not_found (closed without one of ours),
        close_pending (requests still in flight after `wait`)."""
        contract = self.gate.contract_of(record)
        domain = self.gate.domain_of(record)
        if record.close_signature is None:
            if record.status is ChannelStatus.CLOSED:
                raise PaymentError("channel_not_found", f"Channel {record.channel_id} is closed already.")
            if not contract.cooperative_close:
                raise PaymentError(
                    "close_not_supported",
                    f"Channel {record.channel_id} is on a {contract.version.upper()} contract ({contract.address}), "
                    "which has no cooperativeClose: the consumer calls close(channelId) after its expiry to get "
                    "back what was not claimed.",
                )
            record = await self._sign(record, domain)
        assert record.close_amount is not None and record.close_signature is not None
        authorization = CloseAuthorization(record.close_amount, record.close_signature)
        return SignedClose(record.channel_id, authorization, contract.address, domain.chain_id)

    async def _sign(self, record: ChannelRecord, domain: Domain) -> ChannelRecord:
        channel_id = record.channel_id
        ledger = self.gate.ledger
        marked = await ledger.begin_close(channel_id)
        self.gate.forget(channel_id)  # the gate's memory refuses too from now on, without a ledger transaction
        if marked is not None and record.status is ChannelStatus.OPEN:
            log.info("close_requested channel=%s charged=%d reserved=%d", channel_id, marked.charged, marked.reserved)
        if not await self._settled(channel_id):
            raise PaymentError(
                "close_pending",
                f"Requests on channel {channel_id} are still in flight; it takes no new ones. Ask again in "
                f"{CLOSE_RETRY_AFTER} s for the final amount and signature.",
                {"Retry-After": str(CLOSE_RETRY_AFTER)},
            )
        chain_claimed = await self._chain_claimed(record)

        def sign(figures: CloseFigures) -> CloseAuthorization:
            amount = final_amount(figures, chain_claimed)
            return CloseAuthorization(amount, sign_close_authorization(self._key, domain, channel_id, amount))

        signed = await ledger.sign_close(channel_id, sign)
        if signed is None:  # closed on chain meanwhile (the chain watcher booked it)
            raise PaymentError("channel_not_found", f"Channel {channel_id} is closed already.")
        after = await ledger.get_channel(channel_id)
        assert after is not None
        log.info(
            "close_signed channel=%s final_amount=%d charged=%d claimed=%d",
            channel_id,
            signed.final_amount,
            after.charged,
            max(after.claimed, chain_claimed),
        )
        return after

    async def _settled(self, channel_id: str) -> bool:
        """Whether the channel's requests in flight ended within `wait` seconds (none begins now)."""
        deadline = asyncio.get_running_loop().time() + self.wait
        while True:
            record = await self.gate.ledger.get_channel(channel_id)
            if record is None or record.reserved == 0:
                return True
            if asyncio.get_running_loop().time() >= deadline:
                log.info("close_pending channel=%s reserved=%d", channel_id, record.reserved)
                return False
            await asyncio.sleep(self.poll)

    async def _chain_claimed(self, record: ChannelRecord) -> int:
        """The claimed total on chain now (a claim may have landed since the last sync); the
        ledger's figure if the RPC does not answer. A channel gone from chain is left to the
        chain watcher, which books its close: the ledger's figure stands meanwhile."""
        try:
            state = await self.gate.chain_of(record).get_channel(record.channel_id)
        except ChainUnavailable:
            log.warning("close_chain_read_failed channel=%s using=ledger", record.channel_id)
            return record.claimed
        if not state.exists:
            raise PaymentError("channel_not_found", f"Channel {record.channel_id} is closed on chain already.")
        await self.gate.ledger.record_open(record.channel_id, state, block=self.gate.clock.block)
        return state.claimed
