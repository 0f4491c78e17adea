"""The admin API: bearer-token only, and what it reports agrees with the ledger and the chain."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from eth_utils.address import to_checksum_address
from helpers import ChannelFactory, Provider, ProviderFactory, paid_chat

from drain_provider.devtools.devchain import DevChain

TOKEN = "admin-0123456789abcdef-secret"
ENDPOINTS = [
    ("POST", "/claim"),
    ("GET", "/stats"),
    ("GET", "/vouchers"),
    ("GET", "/channels"),
    ("GET", "/claims"),
    ("GET", "/usage"),
]


async def call(provider: Provider, method: str, path: str, token: str | None = None) -> tuple[int, Any, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, f"{provider.url}/admin{path}", headers=headers) as resp,
    ):
        return resp.status, resp.headers, await resp.json()


@pytest.fixture
async def admin(provider_factory: ProviderFactory) -> Provider:
    return await provider_factory(admin_token=TOKEN)


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
async def test_token_is_required(admin: Provider, method: str, path: str) -> None:
    status, headers, body = await call(admin, method, path)
    assert (status, headers["X-DRAIN-Error"]) == (401, "unauthorized")
    assert headers["WWW-Authenticate"] == "Bearer"
    status, _, body = await call(admin, method, path, token=TOKEN[:-1] + "X")
    assert (status, body["error"]["code"]) == (401, "unauthorized")
    assert TOKEN not in str(body)
    status, _, _ = await call(admin, method, path, token=TOKEN)
    assert status == 200


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
async def test_without_admin_token_configured_the_api_is_off(provider: Provider, method: str, path: str) -> None:
    status, headers, body = await call(provider, method, path, token="anything-at-all-long-enough")
    assert (status, headers["X-DRAIN-Error"]) == (403, "admin_disabled")
    assert "ADMIN_TOKEN" in body["error"]["message"]


@pytest.mark.rule(9)
async def test_reports_match_the_ledger_and_the_chain(
    provider_factory: ProviderFactory, open_channel: ChannelFactory, chain: DevChain
) -> None:
    provider = await provider_factory(admin_token=TOKEN)
    first, second = await open_channel(provider), await open_channel(provider)
    for consumer in (first, first, second):
        await paid_chat(provider.client(), consumer, budget=20_000)
    charged = {c.channel_id: c.charged for c in (first, second)}

    _, _, stats = await call(provider, "GET", "/stats", TOKEN)
    assert stats["provider"] == provider.address and stats["chainId"] == chain.chain_id
    books = stats["books"]
    assert int(books["earned"]["baseUnits"]) == sum(charged.values()) == int(books["unclaimed"]["baseUnits"])
    assert books["claimed"] == {"baseUnits": "0", "usdc": "0"} and books["channels"] == {
        "open": 2,
        "closing": 0,
        "closed": 0,
    }
    assert stats["claimThreshold"] == {"baseUnits": "10000000", "usdc": "10"} and stats["lastClaim"] is None
    assert int(stats["gasBalanceWei"]) == await chain.w3.eth.get_balance(to_checksum_address(provider.address))

    _, _, vouchers = await call(provider, "GET", "/vouchers", TOKEN)
    last = {v["channelId"]: v for v in vouchers["vouchers"]}
    assert last[first.channel_id]["nonce"] == "2" and last[first.channel_id]["amount"] == str(first.amount)
    assert last[second.channel_id]["consumer"] == second.address

    # Below the threshold: a plain claim does nothing; force claims both.
    _, _, result = await call(provider, "POST", "/claim", TOKEN)
    assert result["claims"] == []
    _, _, result = await call(provider, "POST", "/claim?force=true", TOKEN)
    assert sorted(c["channelId"] for c in result["claims"]) == sorted(charged)
    assert {c["status"] for c in result["claims"]} == {"confirmed"}
    claimed = sum(int(c["amount"]) for c in result["claims"])
    assert await chain.usdc_balance(provider.address) == claimed

    _, _, stats = await call(provider, "GET", "/stats", TOKEN)
    books = stats["books"]
    assert books["unclaimed"]["baseUnits"] == "0" and int(books["claimed"]["baseUnits"]) == claimed
    assert int(books["creditTaken"]["baseUnits"]) == claimed - sum(charged.values())
    assert stats["lastClaim"]["status"] == "confirmed"
    _, _, channels = await call(provider, "GET", "/channels", TOKEN)
    unclaimed = {c["channelId"]: c["books"]["unclaimed"]["baseUnits"] for c in channels["channels"]}
    assert unclaimed == dict.fromkeys(charged, "0")
    _, _, claims = await call(provider, "GET", "/claims", TOKEN)
    assert len(claims["claims"]) == 2 and all(c["txHash"] for c in claims["claims"])
