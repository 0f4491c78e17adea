"""The free endpoints: models, pricing, the agent guide and the signing parameters (health:
api/health.py)."""

from __future__ import annotations

import textwrap
import time
from typing import Any

from aiohttp import web
from eth_utils.address import to_checksum_address

from ..protocol import ContractRef, Domain, format_usdc, typed_data
from .discovery import base_url
from .errors import ERRORS
from .state import SETTINGS

STARTED_AT = int(time.time())
routes = web.RouteTableDef()


@routes.get("/v1/models")
async def models(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    data = [
        {"id": name, "object": "model", "created": STARTED_AT, "owned_by": "drain-provider"}
        for name in sorted(settings.prices)
    ]
    return web.json_response({"object": "list", "data": data})


@routes.get("/v1/pricing")
async def pricing(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    return web.json_response(
        {
            "provider": settings.provider_address,
            "chainId": settings.chain_id,
            "currency": "USDC",
            "decimals": 6,
            # Vouchers are refused in a channel's last MIN_CHANNEL_TTL seconds: open for longer.
            "minChannelDurationSeconds": settings.min_channel_ttl + 1,
            "models": {
                name: {
                    "inputPer1kTokens": format_usdc(price.input_per_1k),
                    "outputPer1kTokens": format_usdc(price.output_per_1k),
                }
                for name, price in sorted(settings.prices.items())
            },
        }
    )


@routes.get("/v1/signing")
async def signing(request: web.Request) -> web.Response:
    """The EIP-712 messages of every contract served, each ready for signTypedData once its
    `message` is filled in; the top level is the primary contract's voucher, as before."""
    settings = request.app[SETTINGS]
    primary = typed_data(Domain(settings.chain_id, settings.drain_contract), "Voucher")
    return web.json_response(
        {
            "provider": settings.provider_address,
            "chainId": settings.chain_id,
            "contract": settings.drain_contract,
            "contractVersion": settings.contract_version,
            "domain": primary["domain"],
            "types": primary["types"],
            "primaryType": "Voucher",
            "header": "X-DRAIN-Voucher",
            "voucherExample": {
                "channelId": "0x" + "00" * 32,
                "amount": "1000000",
                "nonce": "1",
                "signature": "0x" + "00" * 65,
            },
            "contracts": [_contract_messages(settings.chain_id, ref) for ref in settings.contracts],
            "notes": SIGNING_NOTES,
        }
    )


def _contract_messages(chain_id: int, ref: ContractRef) -> dict[str, Any]:
    domain = Domain(chain_id, ref.address)
    names = ["Voucher", "ConsumerRequest"] + ["CloseAuthorization"] * ref.cooperative_close
    return {
        "address": to_checksum_address(ref.address),
        "version": ref.version,
        "messages": {name: typed_data(domain, name) for name in names},
    }


SIGNING_NOTES = {
    "Voucher": "Signed by the channel's consumer for every paid request: nonce = last + 1, amount = the "
    "cumulative total (base units). Sent as the X-DRAIN-Voucher header.",
    "ConsumerRequest": 'Signed by the channel\'s consumer to prove a request about its channel: action "close" '
    '(POST /v1/close-channel) or "usage" (GET /v1/channels/{id}/usage); timestamp in unix seconds, within '
    "300 s of the provider's clock.",
    "CloseAuthorization": "Signed by the provider: what POST /v1/close-channel returns (V2 only). Check that it "
    "recovers to the provider, then call cooperativeClose(channelId, finalAmount, signature).",
    "signature": "0x + 65 bytes: r, s, v with v 27 or 28, s in the lower half of the curve order.",
    "usage": "Fill `message` and pass the object to viem's signTypedData, eth_signTypedData_v4 or eth-account's "
    "sign_typed_data(full_message=...). ethers v6: signTypedData(domain, types without EIP712Domain, message). "
    "Each contract has its own domain: sign under the contract that holds the channel.",
}


@routes.get("/v1/docs")
async def docs(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    root = base_url(request)
    prices = "\n".join(
        f"  {name}: {format_usdc(p.input_per_1k)} USDC in / {format_usdc(p.output_per_1k)} USDC out per 1k tokens"
        for name, p in sorted(settings.prices.items())
    )
    text = DOCS_TEMPLATE.format(
        errors=_codes_by_status(),
        root=root,
        provider=settings.provider_address,
        chain=settings.chain_id,
        contract=settings.drain_contract,
        prices=prices,
        ttl=settings.min_channel_ttl,
    )
    return web.Response(text=text, content_type="text/plain")


def _codes_by_status() -> str:
    by_status: dict[int, list[str]] = {}
    for code, spec in ERRORS.items():
        by_status.setdefault(spec.status, []).append(code)
    by_status.setdefault(504, []).append("upstream_error (timed out)")
    lines = [f"{status}: {', '.join(codes)}" for status, codes in sorted(by_status.items())]
    return "\n".join(textwrap.fill(line, 95, initial_indent="  ", subsequent_indent="       ") for line in lines)


DOCS_TEMPLATE = """\
DRAIN provider: OpenAI-compatible chat completions, paid per token with DRAIN vouchers.

Endpoint:  {root}/v1/chat/completions  (also {root}/v1/completions)
Provider:  {provider}
Chain id:  {chain}
Contract:  {contract}  (DrainChannel)
Models and prices (USDC, 6 decimals; amounts in requests are base units, 1 USDC = 1000000):
{prices}

How to pay, step by step
1. Open a channel (once): approve the contract to spend your USDC, then call
   open(provider={provider}, amount=<deposit in base units>, duration=<seconds>).
   The channelId is in the ChannelOpened event of the receipt. Vouchers are refused in the last
   {ttl} s of a channel, so the duration must be above {ttl} s; an hour or more is sensible.
2. For EVERY request, sign a new EIP-712 voucher (parameters as JSON: GET {root}/v1/signing):
   domain  {{name: "DrainChannel", version: "1", chainId: {chain}, verifyingContract: {contract}}}
   type    Voucher(bytes32 channelId, uint256 amount, uint256 nonce)
   nonce   = previous nonce + 1 (start at 1)
   amount  = CUMULATIVE: previous amount + what this request may cost. Unspent amount carries
             over to the next request, so signing a little ahead is safe.
3. Send the request in the OpenAI format with the header
   X-DRAIN-Voucher: {{"channelId":"0x..","amount":"<base units>","nonce":"<n>","signature":"0x..(65 bytes)"}}
4. Read the answer's headers: X-DRAIN-Cost (this request), X-DRAIN-Total (charged on the channel
   so far), X-DRAIN-Remaining (deposit - total), X-DRAIN-Next-Min, X-DRAIN-Channel. Streams
   ("stream": true) carry the figures as SSE comment lines (": X-DRAIN-Cost: 102") before [DONE].
   To sign exactly what a request needs, sign max(X-DRAIN-Next-Min, X-DRAIN-Total + the cost of
   your input + max_tokens at the prices above): X-DRAIN-Next-Min is the least the next voucher
   may carry (it covers a request with no input and a minimal output). Whatever you sign above
   the charge stays yours, but the provider may claim a voucher up to the amount you signed.

What you are charged: input and output tokens as the upstream model reports them, at the prices
above (cost = in*inPrice//1000 + out*outPrice//1000). A request reserves its worst case
(input + max_tokens) before it runs; if your voucher leaves room for less, max_tokens is lowered
to what it pays for. Failed upstream calls are not charged.

Errors: JSON {{"error": {{"message", "type", "code"}}}} plus header X-DRAIN-Error.
insufficient_funds comes with X-DRAIN-Required (the cumulative amount needed) and
X-DRAIN-Provided; channel_expiring means: open a new channel; rate_limited (429: too many
refused payments from your address) comes with Retry-After, the seconds to wait. Codes by status:
{errors}

Other endpoints: GET {root}/v1/models, GET {root}/v1/pricing, GET {root}/v1/signing, GET {root}/health.
Python: the drain_provider package's DrainConsumer opens channels and signs vouchers for you.
"""
