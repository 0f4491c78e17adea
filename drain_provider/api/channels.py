"""The channel endpoints (docs/PROTOCOL.md, "Channels"): cooperative close, a channel's status,
and its usage history.

    POST /v1/close-channel                  {"channelId"} (+ "timestamp", "signature"): closing.py
    GET  /v1/channels/{channelId}           where the channel stands; public
    GET  /v1/channels/{channelId}/usage     its paid requests; the consumer's signature only

A channel new to the ledger is looked up on chain, as a first voucher would be; one that is not
ours is a 404 `channel_not_found` here (a 402 on the paid endpoints). Each route's refusals count
toward the client's limit of refused requests (api/clients.py): an unknown id costs an RPC call.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from typing import Any

from aiohttp import web
from eth_utils.address import to_checksum_address

from ..consumer_auth import ConsumerRequestError, SignedRequest, check_signed_request, parse_signed_request
from ..ledger import ChannelRecord
from ..payments import PaymentError
from ..usage_view import UsageQueryError, whole_param
from .body import parse_json_object, read_body
from .clients import limit_channel_failures
from .errors import ApiError
from .state import CLOSER, GATE, LEDGER, SETTINGS

routes = web.RouteTableDef()

_CHANNEL_ID = re.compile(r"0x[0-9a-fA-F]{64}")
_CLOSE_FIELDS = frozenset({"channelId", "timestamp", "signature"})
USAGE_LIMIT = 100
MAX_USAGE_LIMIT = 500
NO_STORE = {"Cache-Control": "no-store"}


def _channel_id(value: object) -> str:
    if not isinstance(value, str) or not _CHANNEL_ID.fullmatch(value):
        raise ApiError("invalid_request", "channelId must be 0x followed by 64 hex digits.")
    return value.lower()


@contextlib.contextmanager
def _ours(request: web.Request, channel_id: str) -> Iterator[None]:
    """A channel that does not exist, is not ours, or is closed without a close of ours: 404."""
    try:
        yield
    except PaymentError as exc:
        if exc.code not in ("channel_not_found", "wrong_provider"):
            raise
        provider = request.app[SETTINGS].provider_address
        message = (
            exc.message if exc.code == "channel_not_found" else f"Channel {channel_id} is not a channel of {provider}."
        )
        raise ApiError("channel_not_found", message, status=404) from None


def _signed(timestamp: object, signature: object, *, required: bool, action: str) -> SignedRequest | None:
    """The consumer's signed request, if given (and then well-formed), or if `required`."""
    try:
        signed = parse_signed_request(timestamp, signature)
    except ConsumerRequestError as exc:
        raise ApiError("invalid_consumer_signature", f"Invalid consumer signature: {exc}.") from None
    if signed is None and required:
        raise ApiError(
            "consumer_signature_required",
            f'This needs the channel consumer\'s EIP-712 ConsumerRequest(channelId, action "{action}", timestamp) '
            "under the channel contract's domain: send timestamp (unix seconds) and signature.",
        )
    return signed


def _check(request: web.Request, record: ChannelRecord, signed: SignedRequest, action: str) -> None:
    gate = request.app[GATE]
    try:
        check_signed_request(
            signed,
            separator=gate.domain_of(record).separator,
            channel_id=record.channel_id,
            action=action,
            consumer=record.consumer,
            now=time.time(),
        )
    except ConsumerRequestError as exc:
        raise ApiError("invalid_consumer_signature", f"Invalid consumer signature: {exc}.") from None


@routes.post("/v1/close-channel")
@limit_channel_failures
async def close_channel(request: web.Request) -> web.Response:
    body = parse_json_object(await read_body(request))
    unknown = sorted(set(body) - _CLOSE_FIELDS)
    if unknown:
        raise ApiError(
            "invalid_request",
            f'Unexpected fields {", ".join(unknown)[:100]}: the body is {{"channelId"}}, with "timestamp" and '
            '"signature" when the consumer signs the request.',
        )
    channel_id = _channel_id(body.get("channelId"))
    required = request.app[SETTINGS].close_requires_signature
    signed = _signed(body.get("timestamp"), body.get("signature"), required=required, action="close")
    with _ours(request, channel_id):
        record = await request.app[GATE].record_of(channel_id)
        if signed is not None:
            _check(request, record, signed, "close")
        closed = await request.app[CLOSER].close(record)
    answer = {
        "channelId": closed.channel_id,
        "finalAmount": str(closed.authorization.final_amount),
        "signature": closed.authorization.signature,
        "contract": closed.contract,
        "chainId": closed.chain_id,
    }
    return web.json_response(answer, headers=NO_STORE)


@routes.get("/v1/channels/{channel_id}")
@limit_channel_failures
async def channel_status(request: web.Request) -> web.Response:
    channel_id = _channel_id(request.match_info["channel_id"])
    gate = request.app[GATE]
    with _ours(request, channel_id):
        record = await gate.record_of(channel_id)
    contract = gate.contract_of(record)
    authorization = None
    if record.close_signature is not None:
        authorization = {"finalAmount": str(record.close_amount), "signature": record.close_signature}
    answer = {
        "channelId": record.channel_id,
        "chainId": gate.domain_of(record).chain_id,
        "contract": contract.address,
        "contractVersion": contract.version,
        "consumer": to_checksum_address(record.consumer),
        "provider": to_checksum_address(record.provider),
        "status": record.status,
        "deposit": str(record.deposit),
        "charged": str(record.charged),
        "reserved": str(record.reserved),
        "claimed": str(record.claimed),
        "remaining": str(record.deposit - record.charged),
        "expiry": record.expiry,
        "lastVoucher": (
            {"nonce": str(record.last_nonce), "amount": str(record.last_amount)} if record.last_nonce > 0 else None
        ),
        "next": {
            "nonce": str(record.last_nonce + 1),
            "minAmount": str(max(record.last_amount, record.charged + record.reserved)),
        },
        "closeAuthorization": authorization,
    }
    return web.json_response(answer, headers=NO_STORE)


def _count(query: Any, name: str, *, default: int | None, maximum: int) -> int | None:
    try:
        value = whole_param(query, name, minimum=1, maximum=maximum)
    except UsageQueryError as exc:
        raise ApiError("invalid_request", str(exc)) from None
    return default if value is None else value


@routes.get("/v1/channels/{channel_id}/usage")
@limit_channel_failures
async def channel_usage(request: web.Request) -> web.Response:
    channel_id = _channel_id(request.match_info["channel_id"])
    query = request.query
    limit = _count(query, "limit", default=USAGE_LIMIT, maximum=MAX_USAGE_LIMIT)
    assert limit is not None
    before = _count(query, "before", default=None, maximum=2**63 - 1)
    signed = _signed(query.get("timestamp"), query.get("signature"), required=True, action="usage")
    assert signed is not None
    with _ours(request, channel_id):
        record = await request.app[GATE].record_of(channel_id)
    _check(request, record, signed, "usage")
    rows = await request.app[LEDGER].usage(channel_id, limit=limit + 1, before=before)
    items = [
        {
            "id": row.id,
            "createdAt": row.created_at,
            "endpoint": row.endpoint,
            "model": row.model,
            "status": row.status,
            "inputTokens": row.input_tokens,
            "outputTokens": row.output_tokens,
            "cost": str(row.cost),
            "nonce": str(row.nonce),
            "voucherAmount": str(row.voucher_amount),
        }
        for row in rows[:limit]
    ]
    next_before = rows[limit - 1].id if len(rows) > limit else None
    return web.json_response({"channelId": channel_id, "items": items, "nextBefore": next_before}, headers=NO_STORE)
