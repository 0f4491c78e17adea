"""Keeping the ledger's picture of the chain current, every few seconds, apart from claims.

A consumer may close a channel at any time with the provider's signature (cooperative close) and
after expiry without it; from then on every voucher of the channel is worthless. So the
watcher, every CHAIN_POLL_INTERVAL, reads the latest block (the chain clock the gate refuses
expiring channels by) and the ChannelClosed events of every contract served (V1 and V2: one
eth_getLogs for all) since the last poll. A closed
channel of ours is booked at once, with what its close really paid, and dropped from the
gate's cache: it is refused within one poll, whatever CLAIM_INTERVAL is.

The block read up to is kept in the ledger, so a restart resumes where the last run stopped:
a close while the server was down is found in the logs (or, more than MAX_CATCH_UP blocks
behind, by re-reading the channels). As a safety net, each claim cycle re-reads the channels
holding vouchers the chain has not paid (`refresh_stale`); a channel found closed that way is
looked up in the logs from the last block it was seen open.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from .chain import ChainClient, ChainClock, ChainUnavailable
from .gas import GasGauge
from .ledger import ChannelRecord, Ledger
from .protocol import ChannelClose

log = logging.getLogger(__name__)

LOG_RANGE = 1000  # blocks per eth_getLogs: public RPCs refuse much wider ranges
MAX_CATCH_UP = 20 * LOG_RANGE  # further behind than this: re-read the channels instead of the logs
MAX_CLOSE_SCAN = 50  # ranges searched, newest first, for the close of a channel found closed
REFRESH_CONCURRENCY = 8


class ChainWatcher:
    """Watches every contract served: `chains` is one client per contract (the primary first),
    or one client when only one is served."""

    def __init__(
        self,
        ledger: Ledger,
        chains: ChainClient | Sequence[ChainClient],
        clock: ChainClock,
        *,
        poll_interval: float,
        on_closed: Callable[[str], None] | None = None,
        gas: GasGauge | None = None,
    ) -> None:
        self.ledger = ledger
        self.chains = (chains,) if isinstance(chains, ChainClient) else tuple(chains)
        self.chain = self.chains[0]  # the primary's; block, gas and fees are the chain's, whichever reads them
        self._by_address = {chain.address.lower(): chain for chain in self.chains}
        self.clock = clock
        self.poll_interval = poll_interval
        self.gas = gas  # the provider's gas, read at every poll
        self.fees: dict[str, int] = {}  # each contract's protocol fee (V1: 0), read at start, by lower-case address
        # What /health says of the RPC: None until the first poll, then whether the last answered.
        self.reachable: bool | None = None
        self.last_poll_at: float | None = None  # the last poll that succeeded
        self.head: tuple[int, int] | None = None  # the latest block's number and timestamp read
        self.last_error: str | None = None  # the last poll's failure (never a URL)
        self.last_error_at: float | None = None
        self._on_closed = on_closed  # told of each channel found closed (the gate drops its cache)
        self._next_block: int | None = None  # the first block whose logs are not read yet

    async def run(self) -> None:
        """Poll forever (owned by the app)."""
        while True:
            try:
                await self.poll()
                if self.reachable is False:
                    log.info("chain_watch_recovered block=%s", self.clock.block)
                self.reachable = True
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the loop outlives any one poll, or /health would go stale
                if self.reachable is not False:  # once per outage, not every few seconds
                    if isinstance(exc, ChainUnavailable):
                        log.warning("chain_watch_failed reason=%s", exc)
                    else:
                        log.exception("chain_watch_crashed")
                self.reachable = False
                self.last_error = str(exc) if isinstance(exc, ChainUnavailable) else type(exc).__name__
                self.last_error_at = time.time()
            await asyncio.sleep(self.poll_interval)

    async def poll(self) -> list[ChannelClose]:
        """The chain clock and the gas, then the closes since the last poll; returns the closes booked."""
        number, timestamp = await self.chain.head()
        self.clock.observe(number, timestamp)
        self.head = (number, timestamp)
        if len(self.fees) < len(self.chains):
            for chain in self.chains:
                self.fees[chain.address.lower()] = await chain.fee_bps()
        if self.gas is not None:
            await self.gas.read(self.chain)
        self.last_poll_at = time.time()
        start = self._next_block
        if start is None:  # where the last run stopped reading (a close while down is found)
            start = await self.ledger.watched_block()
        if start is not None and start > number:  # no new block
            return []
        booked: list[ChannelClose] = []
        if start is not None and number - start > MAX_CATCH_UP:
            log.warning("chain_watch_gap blocks=%d action=refresh_channels", number - start)
            await self.refresh_stale(synced_before=time.time())
        elif start is not None:  # (a new ledger starts the log at the next block)
            booked = await self._book_closes(start, number)
        # Only now: a range that failed to read is read again at the next poll.
        self._next_block = number + 1
        await self.ledger.set_watched_block(number + 1)
        return booked

    @property
    def fee_bps(self) -> int | None:
        """The primary contract's protocol fee (None before the first poll)."""
        return self.fees.get(self.chain.address.lower())

    def fee_of(self, contract: str) -> int:
        """A contract's protocol fee, as read at start (0 before, and for V1)."""
        return self.fees.get(contract.lower(), 0)

    def chain_for(self, contract: str) -> ChainClient | None:
        """The client of a served contract (EIP-55 or any case); None if it is not served."""
        return self._by_address.get(contract.lower())

    async def _book_closes(self, first_block: int, last_block: int) -> list[ChannelClose]:
        contracts = [chain.address for chain in self.chains] if len(self.chains) > 1 else []
        logs = []
        for first in range(first_block, last_block + 1, LOG_RANGE):
            logs += await self.chain.close_logs(first, min(first + LOG_RANGE - 1, last_block), contracts=contracts)
        # Every provider's closes are in the logs: only ours, on the contract each lives on, are
        # looked into and booked.
        ours = await self.ledger.open_among({self.chain.closed_channel(entry) for entry in logs})
        booked = []
        for entry in logs:
            contract = ours.get(self.chain.closed_channel(entry))
            chain = self.chain_for(self.chain.log_contract(entry))
            if contract is not None and chain is not None and contract.lower() == chain.address.lower():
                close = await chain.close_of(entry)
                await self._book(close.channel_id, close)
                booked.append(close)
        return booked

    async def refresh_stale(self, *, synced_before: float) -> None:
        """Re-read the channels holding vouchers the chain has not paid, not read since
        `synced_before`: a close the logs did not show is found here."""
        stale = await self.ledger.channels_to_refresh(synced_before=synced_before)
        limit = asyncio.Semaphore(REFRESH_CONCURRENCY)

        async def refresh(channel_id: str, contract: str) -> None:
            async with limit:
                await self.refresh(channel_id, contract)

        await asyncio.gather(*(refresh(channel_id, contract) for channel_id, contract in stale))

    async def refresh(self, channel_id: str, contract: str | None = None) -> ChannelRecord | None:
        """Read one channel from its contract (`contract`, else the ledger's) into the ledger,
        after a claim or when it is stale. A channel on a contract no longer served is left as
        it is (None)."""
        if contract is None:
            record = await self.ledger.get_channel(channel_id)
            contract = record.contract if record is not None else self.chain.address
        chain = self.chain_for(contract)
        if chain is None:
            return None
        state = await chain.get_channel(channel_id)
        if state.exists:
            return await self.ledger.record_open(channel_id, state, block=self.clock.block)
        return await self._book(channel_id, await self._find_close(channel_id, chain))

    async def _find_close(self, channel_id: str, chain: ChainClient) -> ChannelClose | None:
        """The channel's ChannelClosed event, searched from the newest blocks back to the last
        block it was seen open."""
        number = self.clock.block if self.clock.block is not None else (await self.chain.head())[0]
        oldest = await self.ledger.seen_block(channel_id)
        if oldest is None:
            return None
        last = number
        for _ in range(MAX_CLOSE_SCAN):
            if last < oldest:
                break
            first = max(oldest, last - LOG_RANGE + 1)
            found = await chain.close_logs(first, last, channel_id)
            if found:
                return await chain.close_of(found[-1])
            last = first - 1
        return None

    async def _book(self, channel_id: str, close: ChannelClose | None) -> ChannelRecord | None:
        record = await self.ledger.book_close(channel_id, close)
        if self._on_closed is not None:
            self._on_closed(channel_id)
        if record is None:
            return None
        log.log(
            logging.ERROR if record.lost else logging.INFO,
            "channel_closed channel=%s kind=%s charged=%d claimed=%d fee=%d lost=%d tx=%s",
            channel_id,
            record.close_kind,
            record.charged,
            record.claimed,
            record.fee,
            record.lost,
            close.tx_hash if close else None,
        )
        return record
