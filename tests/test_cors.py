"""CORS as a browser meets it: real preflight requests (what a browser sends before a paid
request from a web page), and the headers a page may read from a 402 and from a paid answer.
Admin is never open to a browser."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from helpers import ChannelFactory, Provider, ProviderFactory

from drain_provider.config import ConfigError, load_settings

PAGE = "https://app.example.com"
PREFLIGHT = {
    "Origin": PAGE,
    "Access-Control-Request-Method": "POST",
    # What the openai SDK sends from a browser, besides our voucher.
    "Access-Control-Request-Headers": "authorization, content-type, x-drain-voucher, x-stainless-os",
}


async def call(method: str, url: str, headers: dict[str, str], **kwargs: Any) -> tuple[int, Any, str]:
    async with aiohttp.ClientSession() as session, session.request(method, url, headers=headers, **kwargs) as resp:
        return resp.status, resp.headers, await resp.text()


def exposed(headers: Any) -> set[str]:
    return {name.strip().lower() for name in headers.get("Access-Control-Expose-Headers", "").split(",")}


def drain_headers(headers: Any) -> set[str]:
    """Every header a page needs to read: X-DRAIN-*, X-Payment-*, Retry-After."""
    return {n.lower() for n in headers if n.lower().startswith(("x-drain-", "x-payment-")) or n == "Retry-After"}


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/pricing", "/v1/docs", "/health"])
async def test_a_preflight_of_a_paid_or_public_route_is_answered(provider: Provider, path: str) -> None:
    status, headers, body = await call("OPTIONS", str(provider.server.make_url(path)), PREFLIGHT)
    assert status == 204 and body == ""
    assert headers["Access-Control-Allow-Origin"] == "*"
    assert {"GET", "POST"} <= {m.strip() for m in headers["Access-Control-Allow-Methods"].split(",")}
    allowed = {h.strip().lower() for h in headers["Access-Control-Allow-Headers"].split(",")}
    assert {"content-type", "authorization", "x-drain-voucher", "x-request-id", "x-stainless-os"} <= allowed
    assert int(headers["Access-Control-Max-Age"]) > 0
    assert "X-DRAIN-Error" not in headers  # not a refused payment: nothing counted against the client


async def test_admin_is_never_open_to_a_browser(provider_factory: ProviderFactory) -> None:
    provider = await provider_factory(admin_token="a-long-enough-admin-token")
    url = str(provider.server.make_url("/v1/admin/stats"))
    status, headers, _ = await call("OPTIONS", url, PREFLIGHT)
    assert status == 401 and not any(name.startswith("Access-Control-") for name in headers)  # no token in it
    auth = {"Origin": PAGE, "Authorization": "Bearer a-long-enough-admin-token"}
    status, headers, _ = await call("GET", url, auth)
    assert status == 200 and not any(name.startswith("Access-Control-") for name in headers)


async def test_a_page_reads_why_a_payment_was_refused_and_how_to_pay(provider: Provider) -> None:
    body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
    status, headers, _ = await call("POST", f"{provider.url}/chat/completions", {"Origin": PAGE}, json=body)
    assert status == 402 and headers["X-DRAIN-Error"] == "voucher_required"
    assert headers["Access-Control-Allow-Origin"] == "*"
    wanted = drain_headers(headers)
    assert {"x-drain-error", "x-payment-contract", "x-payment-signing", "x-payment-docs"} <= wanted
    assert wanted <= exposed(headers)


async def test_a_page_reads_what_a_paid_answer_cost(provider: Provider, open_channel: ChannelFactory) -> None:
    consumer = await open_channel(provider)
    for stream in (False, True):
        voucher = consumer.next_voucher(100_000)
        body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
        headers_in = {"Origin": PAGE, "X-DRAIN-Voucher": voucher.header_value()}
        status, headers, text = await call("POST", f"{provider.url}/chat/completions", headers_in, json=body)
        assert status == 200, text
        assert headers["Access-Control-Allow-Origin"] == "*"
        wanted = drain_headers(headers)
        assert wanted <= exposed(headers)
        if stream:  # the figures follow as SSE comments; the headers say what was reserved
            assert {"x-drain-channel", "x-drain-reserved"} <= wanted and ": X-DRAIN-Cost: " in text
        else:
            assert {"x-drain-cost", "x-drain-total", "x-drain-remaining", "x-drain-next-min"} <= wanted
            consumer.record(headers)


async def test_a_retry_after_is_readable(provider_factory: ProviderFactory) -> None:
    provider = await provider_factory(payment_failures_per_minute=1)
    url = f"{provider.url}/chat/completions"
    await call("POST", url, {"Origin": PAGE}, json={})
    status, headers, _ = await call("POST", url, {"Origin": PAGE}, json={})
    assert status == 429 and "retry-after" in exposed(headers)


async def test_only_the_listed_origins(provider_factory: ProviderFactory) -> None:
    provider = await provider_factory(cors_origins=(PAGE, "http://localhost:5173"))
    url = str(provider.server.make_url("/v1/chat/completions"))
    status, headers, _ = await call("OPTIONS", url, PREFLIGHT)
    assert status == 204 and headers["Access-Control-Allow-Origin"] == PAGE
    assert "Origin" in headers.getall("Vary")  # caches keep one answer per origin
    status, headers, _ = await call("OPTIONS", url, {**PREFLIGHT, "Origin": "https://evil.example"})
    assert status == 405 and "Access-Control-Allow-Origin" not in headers
    status, headers, _ = await call("GET", f"{provider.url}/pricing", {"Origin": "https://evil.example"})
    assert status == 200 and "Access-Control-Allow-Origin" not in headers and "Origin" in headers.getall("Vary")


async def test_cors_off(provider_factory: ProviderFactory) -> None:
    provider = await provider_factory(cors_origins=())
    status, headers, _ = await call("OPTIONS", str(provider.server.make_url("/v1/chat/completions")), PREFLIGHT)
    assert status == 405 and not any(name.startswith("Access-Control-") for name in headers)
    status, headers, _ = await call("GET", f"{provider.url}/pricing", {"Origin": PAGE})
    assert status == 200 and not any(name.startswith("Access-Control-") for name in headers)


def test_the_setting() -> None:
    base = {"PROVIDER_PRIVATE_KEY": "0x" + "11" * 32, "OPENAI_API_KEY": "sk-test"}
    assert load_settings(base).cors_origins == ("*",)
    assert load_settings({**base, "CORS_ORIGINS": "none"}).cors_origins == ()
    listed = load_settings({**base, "CORS_ORIGINS": "https://App.Example.com:443, http://localhost:5173/"})
    assert listed.cors_origins == ("https://app.example.com", "http://localhost:5173")
    for bad in ("app.example.com", "https://app.example.com/path", "ftp://x.example", "https://", "https://[::1"):
        with pytest.raises(ConfigError, match="CORS_ORIGINS: entry 1 must be an origin"):
            load_settings({**base, "CORS_ORIGINS": bad})
