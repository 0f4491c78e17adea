"""An agent with nothing but GET /v1/docs, eth-account, an ABI encoder and plain JSON-RPC pays the
provider on a real node (anvil): approve and open a channel, find the channel id in the receipt,
pay a request, stream one and read its cost, look at the channel's status, close it cooperatively. Every address,
signature, topic and format it uses is read out of the docs' text, so a wrong doc fails here."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import aiohttp
from eth_abi.abi import encode
from eth_account import Account
from eth_utils.address import is_checksum_address
from helpers import USDC, ProviderFactory, RpcProxy, wait_for

from drain_provider.chain import ChainClient
from drain_provider.devtools.devchain import DevChain
from drain_provider.protocol import keccak

ADDRESS = r"(0x[0-9a-fA-F]{40})"


def fact(pattern: str, text: str, group: int = 1) -> str:
    """What the docs say, by a pattern around it; fails with the pattern when they do not say it."""
    match = re.search(pattern, text, re.MULTILINE)
    assert match is not None, f"/v1/docs does not say {pattern!r}"
    return match.group(group)


def function(signature: str) -> tuple[str, list[str], bytes]:
    """name(type,type) -> its name, argument types and selector, as an ABI encoder needs them."""
    name, _, args = signature.partition("(")
    return name, [t for t in args.rstrip(")").split(",") if t], keccak(signature.encode())[:4]


def eip712_fields(type_string: str) -> list[dict[str, str]]:
    """Voucher(bytes32 channelId,uint256 amount,...) -> EIP-712 fields."""
    inner = type_string[type_string.index("(") + 1 : -1]
    return [{"type": t, "name": n} for t, n in (part.strip().split(" ") for part in inner.split(","))]


class Node:
    """Plain JSON-RPC: what an agent without web3 has."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session, self.url, self.id = session, url, 0

    async def call(self, method: str, *params: Any) -> Any:
        self.id += 1
        payload = {"jsonrpc": "2.0", "id": self.id, "method": method, "params": list(params)}
        async with self.session.post(self.url, json=payload) as resp:
            answer = await resp.json()
        assert "error" not in answer, answer
        return answer["result"]

    async def transact(self, key: bytes, chain_id: int, to: str, data: bytes) -> dict[str, Any]:
        """Sign with eth-account, send raw, return the receipt."""
        sender = Account.from_key(key).address
        call = {"from": sender, "to": to, "data": "0x" + data.hex()}
        base_fee = int((await self.call("eth_getBlockByNumber", "latest", False))["baseFeePerGas"], 16)
        tx = {
            "type": 2,
            "chainId": chain_id,
            "nonce": int(await self.call("eth_getTransactionCount", sender, "pending"), 16),
            "to": to,
            "value": 0,
            "data": data,
            "gas": int(await self.call("eth_estimateGas", call), 16) * 2,
            "maxPriorityFeePerGas": 10**9,
            "maxFeePerGas": 2 * base_fee + 10**9,
        }
        signed = Account.sign_transaction(tx, key)
        tx_hash = await self.call("eth_sendRawTransaction", "0x" + bytes(signed.raw_transaction).hex())
        receipt = None
        for _ in range(500):  # anvil mines at once, and its receipt follows within milliseconds
            receipt = await self.call("eth_getTransactionReceipt", tx_hash)
            if receipt is not None:
                break
            await asyncio.sleep(0.01)
        assert receipt is not None and receipt["status"] == "0x1", receipt
        return dict(receipt)


async def test_an_agent_pays_by_the_docs_alone(
    anvil_chain: DevChain, anvil_url: str, provider_factory: ProviderFactory
) -> None:
    chain_client = ChainClient.over_http(anvil_url, anvil_chain.contract)
    provider = await provider_factory(chain_client=chain_client, on=anvil_chain)
    key = bytes(Account.create().key)
    me = Account.from_key(key).address
    deposit = 2 * USDC
    await anvil_chain.fund(me, usdc=deposit)  # the agent's wallet: gas and USDC, before it starts

    async with aiohttp.ClientSession() as session:
        async with session.get(f"{provider.url}/docs") as resp:
            docs = await resp.text()
        head = docs[:4000]  # all an agent is shown
        node = Node(session, anvil_url)

        # Where: every address checksummed, as viem wants them.
        provider_address = fact(rf"^Provider +{ADDRESS}$", head)
        chain_id = int(fact(r"^Chain .*chain id (\d+)", head))
        usdc = fact(rf"^USDC +{ADDRESS}$", head)
        contract = fact(rf"^Contract +{ADDRESS} \(DrainChannel v2\)", head)
        assert all(map(is_checksum_address, (provider_address, usdc, contract)))
        assert (chain_id, usdc, contract) == (anvil_chain.chain_id, anvil_chain.token, anvil_chain.contract)
        assert fact(r"RPC (any JSON-RPC endpoint of chain \d+)", head)

        # 1. approve + open, encoded from the signatures the docs print.
        approve_line = re.search(r"on USDC: +(approve\([a-z0-9,]+\)) \[(0x[0-9a-f]{8})\]", head)
        assert approve_line is not None, "/v1/docs does not give approve's signature"
        approve, approve_selector = approve_line.groups()
        _, types, selector = function(approve)
        assert "0x" + selector.hex() == approve_selector
        await node.transact(key, chain_id, usdc, selector + encode(types, [contract, deposit]))

        open_signature = fact(r"on contract: +(open\([a-z0-9,]+\))", head)
        assert fact(r"on contract: +open\([a-z0-9,]+\) \[(0x[0-9a-f]{8})\] provider = " + ADDRESS, head, 2) == (
            provider_address
        )
        minimum = int(fact(r"duration = seconds; at least (\d+)", head))
        assert minimum == provider.settings.min_channel_ttl + 1
        _, types, selector = function(open_signature)
        receipt = await node.transact(
            key, chain_id, contract, selector + encode(types, [provider_address, deposit, 3600])
        )

        # The channel id, from the receipt's log, as the docs say.
        event = fact(r"log (ChannelOpened\([a-z0-9,]+\))", head)
        topic0 = fact(r"whose topics\[0\] is\s+(0x[0-9a-f]{64})", head)
        index = int(fact(r"channelId = topics\[(\d)\]", head))
        assert "0x" + keccak(event.encode()).hex() == topic0
        (log,) = [e for e in receipt["logs"] if e["address"].lower() == contract.lower() and e["topics"][0] == topic0]
        channel_id = log["topics"][index]

        # 2. A voucher, by the domain and type the docs print.
        domain_line = re.search(r'domain +\{name: "(\w+)", version: "(\w+)", chainId: (\d+),', head)
        assert domain_line is not None, "/v1/docs does not give the EIP-712 domain"
        name, version, domain_chain = domain_line.groups()
        domain = {"name": name, "version": version, "chainId": int(domain_chain), "verifyingContract": contract}
        voucher_type = fact(r"^ +type +(Voucher\(.+\))$", head)
        fields = eip712_fields(voucher_type)
        header_name = fact(r"^ +(X-DRAIN-Voucher): \{", head)
        header_example = fact(r"^ +X-DRAIN-Voucher: (\{.*\})$", head)
        assert fact(r"(v = 27 or 28)", head)

        def voucher(amount: int, nonce: int) -> str:
            message = {"channelId": bytes.fromhex(channel_id[2:]), "amount": amount, "nonce": nonce}
            signed = Account.sign_typed_data(key, domain, {"Voucher": fields}, message)
            signature = bytes(signed.signature)
            assert len(signature) == 65 and signature[64] in (27, 28)  # as the docs say
            values = {
                "channelId": channel_id,
                "amount": str(amount),
                "nonce": str(nonce),
                "signature": "0x" + signature.hex(),
            }
            assert list(values) == list(json.loads(header_example))  # the docs' header, field for field
            return json.dumps(values, separators=(",", ":"))

        endpoint = fact(r"^Endpoint +(\S+/chat/completions)", head)
        body = {"model": "demo", "messages": [{"role": "user", "content": "paid by the docs"}], "max_tokens": 20}
        async with session.post(endpoint, json=body, headers={header_name: voucher(100_000, 1)}) as resp:
            assert resp.status == 200, await resp.text()
            total, next_min = int(resp.headers["X-DRAIN-Total"]), int(resp.headers["X-DRAIN-Next-Min"])
            assert int(resp.headers["X-DRAIN-Cost"]) == total > 0

        # 3. A stream, its cost read from the comment lines the docs show.
        prefix = fact(r'like "(: X-DRAIN-Cost: )\d+"', head)
        amount = max(next_min, total + 100_000)  # the docs' rule for the next amount
        async with session.post(
            endpoint, json={**body, "stream": True}, headers={header_name: voucher(amount, 2)}
        ) as resp:
            assert resp.status == 200
            lines = (await resp.text()).splitlines()
        (cost_line,) = [line for line in lines if line.startswith(prefix)]
        cost = int(cost_line[len(prefix) :])
        assert cost > 0 and lines.index(cost_line) < lines.index("data: [DONE]")

        # 4. The channel's status, where the docs say.
        status_url = fact(r"Lost count\? GET (\S+)/v1/channels/<channelId>", head) + f"/v1/channels/{channel_id}"
        async with session.get(status_url) as resp:
            assert resp.status == 200, await resp.text()
            status = await resp.json()
        assert status["status"] == "open" and status["charged"] == str(total + cost)
        assert status["next"]["nonce"] == "3" and int(status["next"]["minAmount"]) >= total + cost

        # 5. Cooperative close, as the docs say: ask the provider, then call cooperativeClose.
        close_url = fact(r"POST (\S+/v1/close-channel) with", head)
        async with session.post(close_url, json={"channelId": channel_id}) as resp:
            assert resp.status == 200, await resp.text()
            signed = await resp.json()
        final_amount = int(signed["finalAmount"])
        assert final_amount == total + cost  # what was charged, not what was signed
        close_signature = fact(r"call\s+(cooperativeClose\([a-z0-9,]+\)) \[0x[0-9a-f]{8}\]", head)
        _, types, selector = function(close_signature)

        async def usdc_balance() -> int:
            data = keccak(b"balanceOf(address)")[:4] + encode(["address"], [me])
            return int(await node.call("eth_call", {"to": usdc, "data": "0x" + data.hex()}, "latest"), 16)

        before = await usdc_balance()
        arguments = [bytes.fromhex(channel_id[2:]), final_amount, bytes.fromhex(signed["signature"][2:])]
        await node.transact(key, chain_id, contract, selector + encode(types, arguments))
        assert await usdc_balance() - before == deposit - final_amount  # the unspent deposit, back now
        async with session.post(endpoint, json=body, headers={header_name: voucher(amount + 100_000, 3)}) as resp:
            assert resp.status == 402  # nothing is served on the channel after its close


async def test_the_token_is_read_from_the_contract_and_said_how_when_it_cannot_be(
    anvil_chain: DevChain, rpc_proxy: RpcProxy, provider_factory: ProviderFactory
) -> None:
    provider = await provider_factory(
        chain_client=ChainClient.over_http(rpc_proxy.url, anvil_chain.contract),
        on=anvil_chain,
        chain_poll_interval=3600,
    )
    await wait_for(lambda: provider.watcher.last_poll_at is not None)  # then no poll for an hour
    async with aiohttp.ClientSession() as session:
        rpc_proxy.fail_next = 1
        async with session.get(f"{provider.url}/docs") as resp:
            assert resp.status == 200
            line = fact(r"^(USDC .*)$", await resp.text())
        assert "usdc() [0x" + keccak(b"usdc()")[:4].hex() + "] (eth_call" in line
        started = len(rpc_proxy.calls)
        for _ in range(3):  # read once, then remembered
            async with session.get(f"{provider.url}/docs") as resp:
                assert fact(rf"^USDC +{ADDRESS}$", await resp.text()) == anvil_chain.token
    assert rpc_proxy.calls[started:] == ["eth_call"]
