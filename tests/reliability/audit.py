"""The invariants, counted from the ledger (its SQLite file, or its PostgreSQL database) and from
the chain, never from what the server says about itself. Every figure returned here is a count that must be 0.

- `books`: the ledger against itself (in-flight reservations, charges against usage rows,
  requests charged and released, two accepted vouchers with one nonce, charges above vouchers).
- `vouchers_lost`: the ledger against what clients were told (a 200 means the voucher is stored).
- `claims`: the chain against the ledger (every claim transaction the provider sent, found by
  reading every block; ChannelClaimed events; each channel's claimed total).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

import aiohttp

from drain_provider.protocol import keccak

from .paying import Outcome
from .rig import Rig

CLAIMED_TOPIC = "0x" + keccak(b"ChannelClaimed(bytes32,address,uint256)").hex()


def books(rig: Rig, *, in_flight_done: bool = True) -> dict[str, int]:
    """The ledger's own consistency. `in_flight_done`: nothing is in flight now, so a row still
    `reserved` or a channel's `reserved` above 0 is a reservation left behind."""
    one = rig.query
    figures = {
        # a usage row per paid request: its cost is what the channel was charged for it
        "charged_not_sum_of_costs": one(
            """SELECT COUNT(*) FROM channels c
               WHERE c.charged != (SELECT COALESCE(SUM(cost), 0) FROM usage u WHERE u.channel_id = c.channel_id)"""
        )[0][0],
        "charged_and_released": one("SELECT COUNT(*) FROM usage WHERE cost > 0 AND status IN ('failed', 'abandoned')")[
            0
        ][0],
        "requests_per_voucher_above_1": one(
            "SELECT COUNT(*) FROM (SELECT voucher_id FROM usage GROUP BY voucher_id HAVING COUNT(*) > 1) AS t"
        )[0][0],
        "accepted_vouchers_with_equal_nonce": one(
            "SELECT COUNT(*) FROM (SELECT 1 FROM vouchers GROUP BY channel_id, nonce HAVING COUNT(*) > 1) AS t"
        )[0][0],
        "channels_charged_above_last_voucher": one("SELECT COUNT(*) FROM channels WHERE charged > last_amount")[0][0],
    }
    if in_flight_done:
        figures["usage_rows_reserved"] = one("SELECT COUNT(*) FROM usage WHERE status = 'reserved'")[0][0]
        figures["channels_reserved_not_0"] = one("SELECT COUNT(*) FROM channels WHERE reserved != 0")[0][0]
    return figures


def reserved_rows(rig: Rig) -> int:
    return int(rig.query("SELECT COUNT(*) FROM usage WHERE status = 'reserved'")[0][0])


def vouchers_lost(rig: Rig, outcomes: Iterable[Outcome]) -> int:
    """Vouchers the client was answered 200 for that the ledger does not hold, or holds for a
    lower amount, or that its channel's last voucher is below."""
    stored = {(r["channel_id"], int(r["nonce"])): r["amount"] for r in rig.query("SELECT * FROM vouchers")}
    last = {r["channel_id"]: r["last_amount"] for r in rig.query("SELECT channel_id, last_amount FROM channels")}
    lost = 0
    for o in outcomes:
        if not o.accepted:
            continue
        amount = stored.get((o.channel_id, o.nonce))
        if amount is None or amount < o.amount or last.get(o.channel_id, -1) < o.amount:
            lost += 1
    return lost


def charged_above_signed(rig: Rig, signed: dict[str, int]) -> int:
    """Channels charged more than the highest amount their client ever signed."""
    rows = rig.query("SELECT channel_id, charged FROM channels")
    return sum(1 for r in rows if r["charged"] > signed.get(r["channel_id"], 0))


async def _rpc_batch(session: aiohttp.ClientSession, url: str, calls: list[tuple[str, list[Any]]]) -> list[Any]:
    payload = [{"jsonrpc": "2.0", "id": i, "method": m, "params": p} for i, (m, p) in enumerate(calls)]
    async with session.post(url, json=payload) as resp:
        answers = await resp.json()
    by_id = {a["id"]: a for a in answers}
    return [by_id[i].get("result") for i in range(len(calls))]


async def provider_transactions(rig: Rig) -> list[tuple[dict[str, Any], bool]]:
    """Every transaction the provider's key got mined, with whether it succeeded: read from every
    block of the chain (batched JSON-RPC), so that a claim the ledger forgot is found too."""
    me = rig.provider_address.lower()
    found: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as session:
        (latest,) = await _rpc_batch(session, rig.anvil.url, [("eth_blockNumber", [])])
        numbers = list(range(int(latest, 16) + 1))
        for at in range(0, len(numbers), 200):
            calls = [("eth_getBlockByNumber", [hex(n), True]) for n in numbers[at : at + 200]]
            for block in await _rpc_batch(session, rig.anvil.url, calls):
                found += [tx for tx in block["transactions"] if tx["from"].lower() == me]
        receipts = []
        for at in range(0, len(found), 200):
            calls = [("eth_getTransactionReceipt", [tx["hash"]]) for tx in found[at : at + 200]]
            receipts += await _rpc_batch(session, rig.anvil.url, calls)
    return [(tx, int(receipt["status"], 16) == 1) for tx, receipt in zip(found, receipts, strict=True)]


async def claims(rig: Rig) -> tuple[dict[str, int], dict[str, int]]:
    """(invariants, figures) of the claims: the chain's transactions and events against the
    ledger's `claims` rows and `channels.claimed`."""
    contract = rig.chain.client().contract
    sent: Counter[tuple[str, int]] = Counter()
    reverted = 0
    for tx, succeeded in await provider_transactions(rig):
        if tx["to"] is None or tx["to"].lower() != contract.address.lower():
            continue
        function, args = contract.decode_function_input(tx["input"])
        if function.fn_name != "claim":
            continue
        sent["0x" + bytes(args["channelId"]).hex(), int(args["amount"])] += 1
        reverted += not succeeded
    logs = await rig.chain.w3.eth.get_logs(
        {"address": contract.address, "fromBlock": 0, "toBlock": "latest", "topics": [CLAIMED_TOPIC]}
    )
    events: Counter[str] = Counter()
    paid: Counter[str] = Counter()
    for entry in logs:
        event = contract.events.ChannelClaimed().process_log(entry)
        channel = "0x" + bytes(event["args"]["channelId"]).hex()
        events[channel] += 1
        paid[channel] += int(event["args"]["amount"])
    ledger_claimed = {r["channel_id"]: r["claimed"] for r in rig.query("SELECT channel_id, claimed FROM channels")}
    confirmed = Counter(r["channel_id"] for r in rig.query("SELECT channel_id FROM claims WHERE status = 'confirmed'"))
    claimed_mismatch = 0
    for channel, ledger_value in ledger_claimed.items():
        state = await rig.chain.client().get_channel(channel)
        claimed_mismatch += state.claimed != ledger_value or paid[channel] != state.claimed
    invariants = {
        "claims_duplicated": sum(count - 1 for count in sent.values()),
        "channels_claimed_on_chain_not_in_ledger": claimed_mismatch,
        "channels_claim_events_not_claim_rows": sum(
            1 for channel in set(events) | set(confirmed) if events[channel] != confirmed[channel]
        ),
    }
    figures = {
        "claim_transactions": sum(sent.values()),
        "claim_transactions_reverted": reverted,
        "channels_claimed": len(events),
        "claimed_on_chain": sum(paid.values()),
    }
    return invariants, figures
