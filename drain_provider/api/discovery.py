"""Where clients find this provider: its public base URL and the 402 discovery headers."""

from __future__ import annotations

from aiohttp import web

from .state import SETTINGS


def base_url(request: web.Request) -> str:
    """PUBLIC_URL, or the scheme and host the request came in on."""
    configured = request.config_dict[SETTINGS].public_url
    return configured or f"{request.scheme}://{request.host}"


def discovery_headers(request: web.Request) -> dict[str, str]:
    """What DRAIN clients read from a 402 to find out how to pay (docs/PROTOCOL.md)."""
    settings = request.config_dict[SETTINGS]
    root = base_url(request)
    return {
        "X-Payment-Protocol": f"drain-{settings.contract_version}",
        "X-Payment-Provider": settings.provider_address,
        "X-Payment-Contract": settings.drain_contract,
        "X-Payment-Chain": str(settings.chain_id),
        "X-Payment-Signing": f"{root}/v1/signing",
        "X-Payment-Docs": f"{root}/v1/docs",
    }
