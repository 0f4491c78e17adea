"""The free endpoints, read the way clients read them: the openai SDK lists models, an agent reads
/v1/docs and /v1/pricing, a wallet signs with exactly what /v1/signing gives."""

from __future__ import annotations

import aiohttp
from eth_account import Account
from eth_account.messages import encode_typed_data
from helpers import ChannelFactory, Provider

from drain_provider.devtools.devchain import DevChain
from drain_provider.protocol import Voucher


async def get(url: str) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status, resp.content_type, await resp.text()


async def test_models_list_in_openai_format(provider: Provider) -> None:
    models = await provider.client().models.list()
    assert sorted(m.id for m in models.data) == ["demo", "gpt-4o"]
    assert all(m.object == "model" for m in models.data)


async def test_pricing_in_the_reference_format(provider: Provider) -> None:
    async with aiohttp.ClientSession() as session, session.get(f"{provider.url}/pricing") as resp:
        pricing = await resp.json()
    assert pricing == {
        "provider": provider.address,
        "chainId": provider.settings.chain_id,
        "minChannelDurationSeconds": 601,
        "defaultMaxTokens": 4096,
        "minOutputTokens": 16,
        "currency": "USDC",
        "decimals": 6,
        "models": {
            "demo": {"inputPer1kTokens": "0.001", "outputPer1kTokens": "0.002"},
            "gpt-4o": {"inputPer1kTokens": "0.0075", "outputPer1kTokens": "0.0225"},
        },
    }


async def test_health(provider: Provider) -> None:
    status, _, text = await get(str(provider.server.make_url("/health")))
    assert status == 200 and '"status": "ok"' in text and provider.address in text


async def test_docs_tell_an_agent_everything_within_4000_characters(provider: Provider, chain: DevChain) -> None:
    status, content_type, text = await get(f"{provider.url}/docs")
    assert status == 200 and content_type == "text/plain"
    head = text[:4000]  # what DRAIN clients show an agent
    for fact in (
        provider.address,
        provider.settings.drain_contract,
        str(provider.settings.chain_id),
        "X-DRAIN-Voucher",
        "Voucher(bytes32 channelId,uint256 amount,uint256 nonce)",
        "CUMULATIVE",
        "open(address,uint256,uint256)",
        "approve(address,uint256)",
        "ChannelOpened(bytes32,address,address,uint256,uint256)",
        "USDC       " + chain.token,  # the test chain is no known deployment: read from the contract
        "at least 601",
        "v = 27 or 28",
        ": X-DRAIN-Cost:",
        "X-DRAIN-Next-Min",
        "POST http://",
        "/v1/close-channel",
        "cooperativeClose(bytes32,uint256,bytes)",
        "/v1/channels/<channelId>",
        "RPC any JSON-RPC endpoint of chain",
        "gpt-4o: 0.0075 USDC in / 0.0225 USDC out per 1k tokens",
    ):
        assert fact in head, fact


async def test_a_wallet_signing_from_v1_signing_is_accepted(provider: Provider, open_channel: ChannelFactory) -> None:
    consumer = await open_channel(provider)
    async with aiohttp.ClientSession() as session, session.get(f"{provider.url}/signing") as resp:
        signing = await resp.json()
    message = {"channelId": bytes.fromhex(consumer.channel_id[2:]), "amount": 60_000, "nonce": 1}
    types = {k: v for k, v in signing["types"].items() if k != "EIP712Domain"}
    signable = encode_typed_data(
        domain_data=signing["domain"], message_types={"Voucher": types["Voucher"]}, message_data=message
    )
    signature = Account.sign_message(signable, consumer.account.key).signature
    voucher = Voucher(consumer.channel_id, 60_000, 1, bytes(signature))
    raw = await provider.client().chat.completions.with_raw_response.create(
        model="demo",
        messages=[{"role": "user", "content": "signed by a wallet"}],
        extra_headers={"X-DRAIN-Voucher": voucher.header_value()},
    )
    assert int(raw.headers["X-DRAIN-Cost"]) > 0
