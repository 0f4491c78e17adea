"""Where clients find this provider: its public base URL and the 402 discovery headers.

The Host header is the client's to write: reflected as it came, a forged one would put an
attacker's URL into the discovery headers and /v1/docs (and into any cache in front of them).
So without PUBLIC_URL it is used only when it names an allowed host; otherwise the URL is the
address the connection actually came in on.
"""

from __future__ import annotations

import ipaddress

from aiohttp import web

from ..config import Settings
from .state import SETTINGS

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def allowed_hosts(settings: Settings) -> frozenset[str]:
    """ALLOWED_HOSTS, or by default the loopback names and the address the server listens on."""
    if settings.allowed_hosts is not None:
        return frozenset(settings.allowed_hosts)
    return frozenset((*LOOPBACK_NAMES, settings.host.lower().strip("[]")))


def _split_host(host: str) -> tuple[str, str | None]:
    """A Host header's (name, port), the name lower case and an IPv6 address without brackets;
    ("", None) for anything that is not a plain name with an optional numeric port."""
    if host.startswith("["):
        name, bracket, rest = host[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None
        if not bracket or (rest and port is None):
            return "", None
    else:
        name, colon, port_text = host.partition(":")
        port = port_text if colon else None
    if port is not None and not (port.isascii() and port.isdigit() and len(port) <= 5):
        return "", None
    return name.lower(), port


def _host_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _bound_address(request: web.Request) -> str:
    """The address and port the request came in on, as a URL's authority."""
    transport = request.transport
    sockname = transport.get_extra_info("sockname") if transport is not None else None
    if isinstance(sockname, tuple) and len(sockname) >= 2:
        return f"{_host_url(str(ipaddress.ip_address(sockname[0])))}:{int(sockname[1])}"
    settings = request.config_dict[SETTINGS]  # a unix socket, or a connection already gone
    return f"{_host_url(settings.host)}:{settings.port}"


def base_url(request: web.Request) -> str:
    """PUBLIC_URL; else the scheme and Host of the request when its host is allowed; else the
    scheme and the address the request came in on."""
    settings = request.config_dict[SETTINGS]
    if settings.public_url:
        return settings.public_url
    host = request.headers.get("Host", "")
    name, port = _split_host(host)
    if name and name in allowed_hosts(settings):
        authority = _host_url(name) if port is None else f"{_host_url(name)}:{port}"
    else:
        authority = _bound_address(request)
    return f"{request.scheme}://{authority}"


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
