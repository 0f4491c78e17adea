"""The background claimer: turn earned vouchers into USDC on chain, on time, exactly once.

Every CLAIM_INTERVAL it (1) re-reads the channels holding vouchers the chain has not paid (the
chain watcher books closes within seconds; this is its safety net), (2) claims the channels
claim_policy says are due: at the threshold if the claim is worth its gas, and once at the end.
Each channel is claimed on its own contract (V1 or V2, through the watcher's client of it); the
transactions of all of them come from one account, so they share one nonce sequence.

A claim goes through the ledger's `claims` table step by step, so that no crash can make it
happen twice or be forgotten:

    pending (row inserted; at most one per channel, across processes)
      -> signed, tx hash + raw bytes recorded        <- a crash from here on is reconciled:
      -> sent                                           the receipt by hash, else the same
      -> confirmed | reverted | failed                  bytes sent again, else the chain's state

Failures back off exponentially per channel (CLAIM_RETRY_SECONDS, doubling, at most an hour).
A claim that reverts because the chain already holds that amount is reconciled from the chain
and not retried. An empty gas account is an alert (logs, /health, /v1/admin/stats), not a loop;
it clears when the chain watcher reads a balance that pays for the claim (gas.py).

A claim that is due and does not happen is `overdue` (/health's claims_overdue): a channel over
the threshold or past its cut-off while no cycle has succeeded for OVERDUE_CYCLES cycles (the RPC
is down), or whose last OVERDUE_CYCLES claims failed (gas, fees, reverts). It is read from the
ledger alone, so it is known while the chain is not.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass, replace

from eth_account.signers.local import LocalAccount

from .chain import (
    ChainClient,
    ChainUnavailable,
    ContractReverted,
    FeeAboveCeiling,
    InsufficientGasFunds,
    NonceTooLow,
)
from .chainwatch import ChainWatcher
from .claim_policy import ClaimReason, claim_reason, gas_in_usdc, in_final_window, worth_its_gas
from .config import Settings
from .gas import GasGauge, GasLevel
from .ledger import ENGINE_ERRORS, ClaimRecord, ClaimTarget, Ledger
from .protocol import ClaimPaid
from .states import ClaimStatus

log = logging.getLogger(__name__)

MAX_BACKOFF = 3600.0
OVERDUE_CYCLES = 2
LEAD_RETRY = 5.0  # seconds between a non-leader's tries to become the claimer


class NotLeader(Exception):
    """A claim round asked of an instance that is not the claimer (another one holds the lead)."""


@dataclass(frozen=True)
class ClaimOutcome:
    """What one claim attempt came to (PENDING: sent, not mined yet; SKIPPED: another was in
    flight; HELD: not worth its gas yet)."""

    channel_id: str
    amount: int
    status: ClaimStatus
    tx_hash: str | None = None
    error: str | None = None


class Claimer:
    def __init__(
        self,
        ledger: Ledger,
        chain: ChainClient,
        account: LocalAccount,
        settings: Settings,
        watcher: ChainWatcher,
    ) -> None:
        self.ledger = ledger
        self.chain = chain
        self.account = account
        self.settings = settings
        self.watcher = watcher
        self.clock = watcher.clock
        self.gas = watcher.gas or GasGauge(account.address, settings.low_gas_claims)
        self.started_at = time.time()
        self.last_cycle_at: float | None = None  # the last cycle that ended, well or not
        self.last_success_at: float | None = None  # the last cycle that went through
        self._submit = asyncio.Lock()  # one transaction signed and sent at a time: nonces in order
        self._next_nonce: int | None = None
        self._in_flight: set[int] = set()  # claim ids this process is working on
        self.outcomes: Counter[ClaimStatus] = Counter()  # of every cycle's claims (metrics)
        self.leading = False  # this instance is the claimer (always, on SQLite)

    # --- the loop ----------------------------------------------------------------------------

    @property
    def alert(self) -> str | None:
        """Why claims cannot go through: the gas account cannot pay for one (until it can)."""
        return "insufficient_gas_funds" if self.gas.level is GasLevel.EMPTY else None

    async def run(self) -> None:
        """Cycle forever while this instance leads (owned by the app). Several instances on one
        ledger elect one claimer (`Ledger.try_lead`); the others try again every LEAD_RETRY
        seconds. Each cycle first reconciles the pending claims, those another instance left
        when it led included (they are read back from the chain by tx hash). With
        CLAIM_INTERVAL=0 the leader only reconciles, once, and claims when asked."""
        interval = self.settings.claim_interval
        while True:
            was_leading = self.leading
            if await self.lead():
                if interval > 0:
                    await self._guarded(self.cycle())
                    await asyncio.sleep(interval)
                    continue
                if not was_leading:
                    await self._guarded(self.reconcile())
            await asyncio.sleep(min(interval, LEAD_RETRY) if interval > 0 else LEAD_RETRY)

    async def lead(self) -> bool:
        """Take or keep the leadership: whether this instance is the claimer now."""
        try:
            leading = await self.ledger.try_lead()
        except ENGINE_ERRORS as exc:
            log.warning("claimer_election_failed instance=%s error=%s", self.ledger.instance_id, exc)
            leading = False
        if leading and not self.leading:
            self.started_at = time.time()  # what is overdue is counted from here
            log.info("claimer_leading instance=%s", self.ledger.instance_id)
        elif not leading and self.leading:
            log.warning("claimer_not_leading instance=%s", self.ledger.instance_id)
        self.leading = leading
        return leading

    async def _guarded(self, work: object) -> None:
        try:
            await work  # type: ignore[misc]
        except asyncio.CancelledError:
            raise
        except ChainUnavailable as exc:
            log.warning("claimer_cycle_failed reason=%s", exc)
        except Exception:
            log.exception("claimer_cycle_crashed")

    async def cycle(self, *, force: bool = False) -> list[ClaimOutcome]:
        """One claim round; NotLeader on an instance that is not the claimer."""
        if not await self.lead():
            raise NotLeader("another instance is the claimer")
        try:
            await self.clock.sync(self.chain)
            await self.watcher.refresh_stale(synced_before=time.time() - self.settings.claim_interval)
            outcomes = await self.reconcile()
            outcomes += await self.claim_due(force=force)
            self.outcomes.update(outcome.status for outcome in outcomes)
        finally:
            self.last_cycle_at = time.time()
        self.last_success_at = self.last_cycle_at
        return outcomes

    async def overdue(self) -> dict[str, int]:
        """The channels whose claim is overdue, with their unclaimed earnings (see the module's
        docstring). Without automatic claims (CLAIM_INTERVAL=0), and on an instance that is not
        the claimer (the claimer reports its own stalls), only failed claims count."""
        now = time.time()
        interval = self.settings.claim_interval
        stalled = (
            self.leading
            and interval > 0
            and (self.last_success_at or self.started_at) < now - OVERDUE_CYCLES * interval
        )
        rows = await self.ledger.fetchall(
            """SELECT c.channel_id, c.charged - c.claimed FROM channels c
               WHERE c.provider = ? AND c.status != 'closed' AND c.charged > c.claimed
                 AND ((c.status = 'open' AND c.charged - c.claimed >= ?) OR c.expiry <= ?)
                 AND (? OR c.claim_attempts >= ?)
                 AND NOT EXISTS (SELECT 1 FROM claims k WHERE k.channel_id = c.channel_id AND k.status = ?
                                 AND k.id = (SELECT MAX(id) FROM claims WHERE channel_id = c.channel_id))""",
            (
                self.account.address,
                self.settings.claim_threshold,
                self.clock.now() + self.settings.min_channel_ttl,  # past the cut-off: the final claim
                stalled,
                OVERDUE_CYCLES,
                ClaimStatus.HELD,  # not worth its gas yet: a decision, not a failure
            ),
        )
        return {channel_id: unclaimed for channel_id, unclaimed in rows}

    # --- claiming ----------------------------------------------------------------------------

    async def claim_due(self, *, force: bool = False) -> list[ClaimOutcome]:
        now = self.clock.now()
        ttl = self.settings.min_channel_ttl
        targets = await self.ledger.claim_targets(
            provider=self.account.address,
            threshold=self.settings.claim_threshold,
            final_after=now + ttl,
            now=time.time(),
            force=force,
        )
        due = []
        for target in targets:
            reason = claim_reason(
                target, now=now, threshold=self.settings.claim_threshold, min_channel_ttl=ttl, force=force
            )
            if reason is not None:
                due.append(self.claim(target, reason, final=in_final_window(target, now=now, min_channel_ttl=ttl)))
        return list(await asyncio.gather(*due))

    async def claim(
        self, target: ClaimTarget, reason: ClaimReason = ClaimReason.FORCED, *, final: bool = False
    ) -> ClaimOutcome:
        """Claim `target` now. A closing channel is claimed only when `final` (its last window)."""
        if self.watcher.chain_for(target.contract) is None:  # (the ledger's binding refuses to start so)
            return ClaimOutcome(
                target.channel_id, target.voucher.amount, ClaimStatus.SKIPPED, error="its contract is not served"
            )
        claim_id = await self.ledger.begin_claim(target, final=final)
        if claim_id is None:
            return ClaimOutcome(
                target.channel_id,
                target.voucher.amount,
                ClaimStatus.SKIPPED,
                error="a claim is in flight, or the channel is closing",
            )
        record = ClaimRecord.pending(claim_id, target.channel_id, target.voucher.amount)
        self._in_flight.add(claim_id)
        try:
            return await self._submit_claim(target, record, reason)
        finally:
            self._in_flight.discard(claim_id)

    async def _submit_claim(self, target: ClaimTarget, record: ClaimRecord, reason: ClaimReason) -> ClaimOutcome:
        claim_id = record.id
        balance, needed = 0, 1
        contract = self.watcher.chain_for(target.contract)  # each channel is claimed on its own contract
        assert contract is not None
        try:
            async with self._submit:
                balance = await self.chain.balance(self.account.address)
                if balance == 0:  # some nodes refuse even to estimate gas for an empty account
                    raise InsufficientGasFunds("balance 0 wei")
                prepared = await contract.prepare(
                    self.account,
                    contract.claim_call(target.voucher),
                    nonce=await self._nonce(),
                    max_fee_per_gas=self.settings.max_fee_per_gas,
                )
                needed = prepared.max_cost
                if balance < prepared.max_cost:
                    raise InsufficientGasFunds(f"balance {balance} wei, the claim may cost {prepared.max_cost} wei")
                payout = target.voucher.amount - target.claimed
                if reason is ClaimReason.THRESHOLD and not worth_its_gas(
                    payout=payout,
                    fee_bps=self.watcher.fee_of(target.contract),
                    gas_wei=prepared.expected_cost,
                    gas_token_price=self.settings.gas_token_price,
                ):
                    gas = gas_in_usdc(prepared.expected_cost, self.settings.gas_token_price)
                    return await self._close(record, ClaimStatus.HELD, f"gas {gas} above payout {payout}")
                await self.ledger.record_claim_tx(
                    claim_id, tx_hash=prepared.tx_hash, tx_nonce=prepared.nonce, raw_tx=prepared.raw
                )
                record = replace(record, tx_hash=prepared.tx_hash, raw_tx="0x" + prepared.raw.hex())
                self._next_nonce = prepared.nonce + 1
                await self.chain.broadcast(prepared.raw)
        except ContractReverted as exc:
            # Found at gas estimation, nothing sent. InvalidAmount usually means the chain already
            # holds this amount (claimed elsewhere, or by a transaction we lost track of): the
            # refresh brings the ledger up to date and the channel is no longer due.
            await self.watcher.refresh(target.channel_id, target.contract)
            return await self._close(record, ClaimStatus.REVERTED, exc.error, retry_after=MAX_BACKOFF)
        except InsufficientGasFunds as exc:
            self._next_nonce = None
            self.gas.blocked(balance, needed)
            log.error(
                "claim_blocked reason=insufficient_gas_funds provider=%s channel=%s detail=%s",
                self.account.address,
                target.channel_id,
                exc,
            )
            return await self._close(record, ClaimStatus.FAILED, "insufficient_gas_funds")
        except FeeAboveCeiling as exc:
            return await self._close(record, ClaimStatus.FAILED, f"fee_above_ceiling: {exc}")
        except (ChainUnavailable, NonceTooLow) as exc:
            self._next_nonce = None
            if record.tx_hash is not None:  # the send's outcome is unknown: find out from the chain
                return await self._follow_receipt(record)
            return await self._close(record, ClaimStatus.FAILED, f"rpc: {exc}")
        log.info(
            "claim_sent channel=%s reason=%s amount=%d unclaimed=%d tx=%s",
            target.channel_id,
            reason,
            target.voucher.amount,
            target.unclaimed,
            prepared.tx_hash,
        )
        return await self._follow_receipt(record)

    async def _nonce(self) -> int:
        pending = await self.chain.pending_nonce(self.account.address)
        return pending if self._next_nonce is None else max(pending, self._next_nonce)

    async def _follow_receipt(self, record: ClaimRecord) -> ClaimOutcome:
        """Wait for a sent claim's receipt and close its row from what the chain says."""
        assert record.tx_hash is not None
        try:
            result = await self.chain.wait_receipt(
                record.tx_hash, timeout=self.settings.claim_receipt_timeout, poll=self._poll
            )
        except ChainUnavailable as exc:
            return self._outcome(record, ClaimStatus.PENDING, f"rpc: {exc}")
        if result is None:
            return await self._unmined(record)
        await self.watcher.refresh(record.channel_id)
        if not result.succeeded:
            return await self._close(record, ClaimStatus.REVERTED, "reverted on chain", retry_after=MAX_BACKOFF)
        self.gas.cleared()
        # ChannelClaimed and FeePaid have the same layout on every contract (V1 has no FeePaid: fee 0).
        return await self._close(
            record, ClaimStatus.CONFIRMED, paid=self.chain.claim_paid(result.receipt, record.channel_id)
        )

    async def _unmined(self, record: ClaimRecord) -> ClaimOutcome:
        """No receipt: send the very same signed bytes again (a no-op if the node has them), or
        learn from the chain that its nonce went to something else."""
        assert record.raw_tx is not None
        try:
            await self.chain.broadcast(bytes.fromhex(record.raw_tx[2:]))
        except NonceTooLow:
            channel = await self.watcher.refresh(record.channel_id)
            if channel is not None and channel.claimed >= record.amount:
                return await self._close(record, ClaimStatus.CONFIRMED)
            return await self._close(record, ClaimStatus.FAILED, "its nonce was used by another transaction")
        except (ChainUnavailable, InsufficientGasFunds) as exc:
            log.warning("claim_resend_failed channel=%s tx=%s error=%s", record.channel_id, record.tx_hash, exc)
        log.warning("claim_not_mined_yet channel=%s tx=%s", record.channel_id, record.tx_hash)
        return self._outcome(record, ClaimStatus.PENDING)

    async def _close(
        self,
        record: ClaimRecord,
        status: ClaimStatus,
        error: str | None = None,
        *,
        retry_after: float | None = None,
        paid: ClaimPaid | None = None,
    ) -> ClaimOutcome:
        if status in (ClaimStatus.FAILED, ClaimStatus.HELD) and retry_after is None:
            attempts = await self.ledger.claim_attempts(record.channel_id)
            retry_after = min(self.settings.claim_retry_seconds * 2**attempts, MAX_BACKOFF)
        await self.ledger.finish_claim(record.id, status=status, error=error, retry_after=retry_after, paid=paid)
        level = logging.INFO if status in (ClaimStatus.CONFIRMED, ClaimStatus.HELD) else logging.WARNING
        log.log(
            level,
            "claim_%s channel=%s amount=%d tx=%s%s%s",
            status,
            record.channel_id,
            record.amount,
            record.tx_hash,
            f" payout={paid.payout} fee={paid.fee}" if paid else "",
            f" error={error} retry_in_s={retry_after:.0f}" if error else "",
        )
        return self._outcome(record, status, error)

    @staticmethod
    def _outcome(record: ClaimRecord, status: ClaimStatus, error: str | None = None) -> ClaimOutcome:
        return ClaimOutcome(record.channel_id, record.amount, status, record.tx_hash, error)

    @property
    def _poll(self) -> float:
        return 0.05 if self.chain.is_embedded else 1.0

    # --- after a restart ---------------------------------------------------------------------

    async def reconcile(self) -> list[ClaimOutcome]:
        """Pending claims nobody here is working on (left by a crash, or by an RPC failure in an
        earlier cycle): closed from their receipts, re-sent as the same bytes, or, if they never
        got a transaction, closed as failed (nothing was sent)."""
        outcomes = []
        for record in await self.ledger.claims(status=ClaimStatus.PENDING, limit=10_000):
            if record.id in self._in_flight:
                continue
            self._in_flight.add(record.id)
            try:
                outcomes.append(await self._reconcile(record))
            finally:
                self._in_flight.discard(record.id)
        return outcomes

    async def _reconcile(self, record: ClaimRecord) -> ClaimOutcome:
        if record.tx_hash is None:  # stopped before signing: nothing was sent
            return await self._close(record, ClaimStatus.FAILED, "stopped before sending")
        log.info("claim_reconciling channel=%s tx=%s", record.channel_id, record.tx_hash)
        if await self.chain.receipt(record.tx_hash) is None:
            return await self._unmined(record)
        return await self._follow_receipt(record)
