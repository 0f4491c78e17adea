"""The free endpoints: models, pricing, the agent guide and the signing parameters (health:
api/health.py)."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web
from eth_utils.address import to_checksum_address

from ..catalog import Kind, ModelRoute
from ..chain import ChainUnavailable, ContractReverted
from ..protocol import ContractRef, Domain, format_usdc, typed_data
from .discovery import base_url
from .guide import known_usdc, render_guide
from .state import CHAIN, ROUTES, SETTINGS

STARTED_AT = int(time.time())
routes = web.RouteTableDef()


@routes.get("/v1/models")
async def models(request: web.Request) -> web.Response:
    """Every name sold: each model and each alias (an alias is sold too)."""
    data = [
        {"id": name, "object": "model", "created": STARTED_AT, "owned_by": "drain-provider"}
        for name in request.app[ROUTES].catalog.names
    ]
    return web.json_response({"object": "list", "data": data})


def model_pricing(name: str, route: ModelRoute) -> dict[str, str]:
    """One name's entry in /v1/pricing. Per-token models keep the reference provider's fields (the
    decimal USDC prices per 1k tokens); the others say what they are billed on."""
    entry: dict[str, str] = {}
    if route.kind is Kind.IMAGES:
        assert route.per_request is not None
        entry.update(perRequest=format_usdc(route.per_request), billing="per-request")
    else:
        entry.update(
            inputPer1kTokens=format_usdc(route.price.input_per_1k),
            outputPer1kTokens=format_usdc(route.price.output_per_1k),
        )
    if route.kind is not Kind.CHAT:
        entry["kind"] = str(route.kind)
    if route.markup is not None:
        # The token prices are the most a request costs (its reservation); it is charged the
        # upstream's own reported cost times the markup.
        entry.update(markup=route.markup, billing="pass-through")
    if name != route.name:
        entry["aliasOf"] = route.name
    return entry


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
            # Output tokens reserved when a request sets no max_tokens, and the least output a
            # voucher must leave room for (402 otherwise).
            "defaultMaxTokens": settings.default_max_tokens,
            "minOutputTokens": settings.min_output_tokens,
            "models": {name: model_pricing(name, route) for name, route in request.app[ROUTES].catalog.names.items()},
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
    "sign_typed_data(full_message=...) (they ignore ethersTypes). ethers v6: signTypedData(domain, ethersTypes, "
    "message) (it refuses EIP712Domain among the types). "
    "Each contract has its own domain: sign under the contract that holds the channel.",
}


@routes.get("/v1/docs")
async def docs(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    text = render_guide(
        root=base_url(request),
        provider=settings.provider_address,
        chain_id=settings.chain_id,
        contracts=settings.contracts,
        usdc=await _usdc(request),
        catalog=request.app[ROUTES].catalog,
        min_channel_ttl=settings.min_channel_ttl,
    )
    return web.Response(text=text, content_type="text/plain")


async def _usdc(request: web.Request) -> str | None:
    """The deposit token: the known deployments', or the primary contract's `usdc()`; None
    while the RPC cannot say (the guide then says how to read it)."""
    settings = request.app[SETTINGS]
    known = known_usdc(settings.chain_id, settings.contracts)
    if known is not None:
        return known
    try:
        return await request.app[CHAIN].usdc()
    except (ChainUnavailable, ContractReverted):
        return None
