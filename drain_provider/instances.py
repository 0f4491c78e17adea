"""This instance among those sharing a ledger: its heartbeat, and the reaping of the dead.

Every INSTANCE_TIMEOUT/3 the instance beats its heartbeat, then releases what instances silent
for INSTANCE_TIMEOUT left reserved (ledger.reap_dead_instances: exactly once, whichever
instance looks first). An instance found declared dead (it was silent that long itself: a
stalled host, a cut network) registers again under a new id: the reservations of its old id
were released, so the requests it still had in flight under that id are served but not
charged. On SQLite (one process) all of this is a no-op.
"""

from __future__ import annotations

import asyncio
import logging

from .ledger import ENGINE_ERRORS, Ledger, new_instance_id

log = logging.getLogger(__name__)


async def keep_alive(ledger: Ledger, silent_for: float) -> None:
    """Beat and reap forever (owned by the app); a ledger that does not answer is retried at the
    next beat."""
    while True:
        try:
            await beat(ledger, silent_for)
        except ENGINE_ERRORS as exc:
            log.warning("instance_heartbeat_failed instance=%s error=%s", ledger.instance_id, exc)
        await asyncio.sleep(silent_for / 3)


async def beat(ledger: Ledger, silent_for: float) -> None:
    """One heartbeat, then one reaping."""
    if not await ledger.heartbeat():
        old, ledger.instance_id = ledger.instance_id, new_instance_id()
        log.error(
            "instance_declared_dead instance=%s new_instance=%s note=%s",
            old,
            ledger.instance_id,
            "silent longer than INSTANCE_TIMEOUT: its reservations were released, and the requests "
            "it had in flight are not charged",
        )
        await ledger.start_instance()
    await ledger.reap_dead_instances(silent_for)
