"""GET /v1/signing used as it is: each served object, its message filled in, goes straight into
eth-account's `sign_typed_data(full_message=...)`, viem's `signTypedData` and ethers v6's
`Wallet.signTypedData`, and what they sign is what the provider accepts (vouchers) or recovers
(a consumer's request, the provider's close authorization)."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from copy import deepcopy
from typing import Any

import aiohttp
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_utils.address import is_checksum_address
from helpers import REPO, ChannelFactory, Provider, ProviderFactory

from drain_provider.consumer import DrainConsumer
from drain_provider.devtools.devchain import DevChain
from drain_provider.protocol import (
    ContractRef,
    Domain,
    Voucher,
    close_authorization_digest,
    consumer_request_digest,
    recover_signer,
    sign_digest,
)

SIGNER_SCRIPT = REPO / "tests" / "js" / "sign_typed_data.mjs"


async def served(provider: Provider) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(f"{provider.url}/signing") as resp:
        assert resp.status == 200
        return dict(await resp.json())


def filled(obj: dict[str, Any], **message: Any) -> dict[str, Any]:
    """The served object with its message filled in, as a client does (decimal strings)."""
    result = deepcopy(obj)
    assert set(message) == set(result["message"])  # the template names every field to fill
    result["message"] = message
    return result


async def pay_with(provider: Provider, consumer: DrainConsumer, signature: bytes, amount: int, nonce: int) -> int:
    """A paid chat completion through the openai SDK with a voucher signed elsewhere; its cost."""
    voucher = Voucher(consumer.channel_id, amount, nonce, signature)
    raw = await provider.client().chat.completions.with_raw_response.create(
        model="demo",
        messages=[{"role": "user", "content": "signed from /v1/signing"}],
        extra_headers={"X-DRAIN-Voucher": voucher.header_value()},
    )
    return int(raw.headers["X-DRAIN-Cost"])


def eth_account_signature(key: bytes, obj: dict[str, Any]) -> bytes:
    return bytes(Account.sign_typed_data(key, full_message=obj).signature)


async def test_each_contract_served_has_its_own_messages(chain: DevChain, provider_factory: ProviderFactory) -> None:
    contracts = (ContractRef(chain.contract, "v2"), ContractRef(chain.contract_v1, "v1"))
    provider = await provider_factory(contracts=contracts)
    signing = await served(provider)
    assert [(c["address"], c["version"]) for c in signing["contracts"]] == [(r.address, r.version) for r in contracts]
    for ref, entry in zip(contracts, signing["contracts"], strict=True):
        expected = ["Voucher", "ConsumerRequest"] + ["CloseAuthorization"] * (ref.version == "v2")
        assert list(entry["messages"]) == expected
        for name, obj in entry["messages"].items():
            assert set(obj) == {"domain", "types", "primaryType", "message", "ethersTypes"}
            assert obj["ethersTypes"] == {name: obj["types"][name]}
            assert obj["primaryType"] == name and set(obj["types"]) == {"EIP712Domain", name}
            assert obj["domain"] == Domain(provider.settings.chain_id, ref.address).as_json()
            assert is_checksum_address(obj["domain"]["verifyingContract"])
    # Old readers: the top level is the primary's voucher, unambiguous too.
    assert signing["domain"] == signing["contracts"][0]["messages"]["Voucher"]["domain"]
    assert set(signing["types"]) == {"EIP712Domain", "Voucher"} and signing["primaryType"] == "Voucher"


async def test_eth_account_signs_the_served_voucher_and_the_server_takes_it(
    provider: Provider, open_channel: ChannelFactory
) -> None:
    consumer = await open_channel(provider)
    template = (await served(provider))["contracts"][0]["messages"]["Voucher"]
    voucher = filled(template, channelId=consumer.channel_id, amount="60000", nonce="1")
    signature = eth_account_signature(bytes(consumer.account.key), voucher)
    assert await pay_with(provider, consumer, signature, 60_000, 1) > 0


async def test_viem_and_ethers_sign_the_served_objects_as_is(provider: Provider, open_channel: ChannelFactory) -> None:
    node = shutil.which("node")
    assert node is not None, "node is missing"
    consumer = await open_channel(provider)
    key = bytes(consumer.account.key)
    messages = (await served(provider))["contracts"][0]["messages"]
    now = int(time.time())
    objects = [
        filled(messages["Voucher"], channelId=consumer.channel_id, amount="60000", nonce="1"),
        filled(messages["Voucher"], channelId=consumer.channel_id, amount="120000", nonce="2"),
        filled(messages["ConsumerRequest"], channelId=consumer.channel_id, action="usage", timestamp=str(now)),
        filled(messages["CloseAuthorization"], channelId=consumer.channel_id, finalAmount="120000"),
    ]
    proc = await asyncio.create_subprocess_exec(
        node, str(SIGNER_SCRIPT), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, cwd=REPO,
    )  # fmt: skip
    out, err = await proc.communicate(json.dumps({"privateKey": "0x" + key.hex(), "objects": objects}).encode())
    assert proc.returncode == 0, err.decode()
    signed = json.loads(out)
    expected = ["0x" + eth_account_signature(key, obj).hex() for obj in objects]
    assert signed["viem"] == expected and signed["ethers"] == expected
    # The server takes viem's first voucher and ethers' second.
    assert await pay_with(provider, consumer, bytes.fromhex(signed["viem"][0][2:]), 60_000, 1) > 0
    assert await pay_with(provider, consumer, bytes.fromhex(signed["ethers"][1][2:]), 120_000, 2) > 0
    # The consumer's request is the one the provider recovers (protocol.consumer_request_digest).
    digest = consumer_request_digest(provider.domain.separator, consumer.channel_id, "usage", now)
    assert recover_signer(digest, bytes.fromhex(signed["viem"][2][2:])) == consumer.address


async def test_a_close_authorization_verifies_against_the_served_object(
    provider: Provider, open_channel: ChannelFactory
) -> None:
    """What POST /v1/close-channel returns (the provider's signature over its protocol digest)
    recovers to the provider through the served CloseAuthorization object."""
    consumer = await open_channel(provider)
    template = (await served(provider))["contracts"][0]["messages"]["CloseAuthorization"]
    digest = close_authorization_digest(provider.domain.separator, consumer.channel_id, 123_456)
    signature = sign_digest(provider.settings.provider_private_key, digest)
    obj = filled(template, channelId=consumer.channel_id, finalAmount="123456")
    assert Account.recover_message(encode_typed_data(full_message=obj), signature=signature) == provider.address
