"""A small DRAIN client: open a channel, sign the next voucher, read costs back.

Used by `dev` mode, the tests and anyone who wants to pay a provider from Python (it is a client,
not part of the server):

    consumer = await DrainConsumer.open_channel(chain, token, key, provider, deposit=10_000_000)
    voucher = consumer.next_voucher(budget=50_000)
    response = client.chat.completions.with_raw_response.create(
        ..., extra_headers={"X-DRAIN-Voucher": voucher.header_value()})
    consumer.record(response.headers)

Vouchers are cumulative. Unlike clients that add each request's estimate to the last signed
amount (so the signed total drifts ever further ahead of what was spent), `next_voucher` signs
the provider's charged total plus this request's budget, and never less than the last amount:
unspent credit is reused instead of piling up. `voucher_for` signs exactly what a request needs:
its worst case, counted and priced with the provider's own code, on top of the charged total.
The provider may claim any voucher it holds up to its amount, so the exact amount is the
consumer's best protection (X-DRAIN-Next-Min tells the least the next voucher may carry).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils.address import to_checksum_address
from web3.logs import DISCARD

from . import openai_format
from .chain import ChainClient, ContractReverted
from .contracts import load_artifact
from .pricing import ModelPrice
from .protocol import Domain, Voucher, sign_voucher
from .tokens import TokenCounter


@cache
def _counter() -> TokenCounter:
    return TokenCounter()


@dataclass
class DrainConsumer:
    account: LocalAccount
    domain: Domain
    channel_id: str
    deposit: int
    nonce: int = 0  # last signed nonce
    amount: int = 0  # last signed cumulative amount
    charged: int = 0  # the provider's charged total, from the last X-DRAIN-Total
    next_min: int = 0  # the least the next voucher may carry, from the last X-DRAIN-Next-Min
    last_cost: int = 0
    api: str | None = None  # the provider's base URL, ending in /v1

    @property
    def address(self) -> str:
        return str(self.account.address)

    @classmethod
    async def open_channel(
        cls,
        chain: ChainClient,
        token_address: str,
        private_key: bytes | str,
        provider: str,
        *,
        deposit: int,
        duration: int = 86_400,
    ) -> DrainConsumer:
        """approve + open on chain; the channel id is read from the ChannelOpened event."""
        account: LocalAccount = Account.from_key(private_key)
        token = chain.w3.eth.contract(address=to_checksum_address(token_address), abi=load_artifact("TestUSDC")["abi"])
        approved = await chain.send(account, token.functions.approve(chain.address, deposit))
        if not approved.succeeded:
            raise ContractReverted("approve failed")
        opened = await chain.send(
            account, chain.contract.functions.open(to_checksum_address(provider), deposit, duration)
        )
        if not opened.succeeded:
            raise ContractReverted("open failed")
        events = chain.contract.events.ChannelOpened().process_receipt(opened.receipt, errors=DISCARD)
        channel_id = "0x" + bytes(events[0]["args"]["channelId"]).hex()
        domain = Domain(await chain.chain_id(), chain.address)
        return cls(account=account, domain=domain, channel_id=channel_id, deposit=deposit)

    def sign(self, amount: int, nonce: int | None = None) -> Voucher:
        """Sign an explicit cumulative amount (next nonce unless given) and remember it."""
        nonce = self.nonce + 1 if nonce is None else nonce
        voucher = sign_voucher(self.account.key, self.domain, self.channel_id, amount, nonce)
        self.nonce = max(self.nonce, nonce)
        self.amount = max(self.amount, amount)
        return voucher

    def next_voucher(self, budget: int) -> Voucher:
        """A voucher that lets the provider charge up to `budget` more than it has charged."""
        amount = min(max(self.amount, self.charged + budget), self.deposit)
        return self.sign(amount)

    def voucher_for(
        self, body: dict[str, Any], price: ModelPrice, *, min_output_tokens: int = 16, default_max_tokens: int = 4096
    ) -> Voucher:
        """The exact voucher for the chat completion `body` at `price`: the charged total plus
        the request's worst case (input counted as the provider counts it, plus `max_tokens`, or
        `default_max_tokens`, the provider's DEFAULT_MAX_TOKENS, when the body sets none)."""
        request = openai_format.parse_chat(body, {body["model"]: price}, default_max_tokens=default_max_tokens)
        worst_case = request.plan(request.input_tokens(_counter()), min_output_tokens).worst_case
        amount = min(max(self.amount, self.next_min, self.charged + worst_case), self.deposit)
        return self.sign(amount)

    def record(self, headers: Mapping[str, str]) -> None:
        """Take the provider's figures from a paid response's headers."""
        if "X-DRAIN-Next-Min" in headers:
            self.next_min = int(headers["X-DRAIN-Next-Min"])
        if "X-DRAIN-Total" in headers:
            self.charged = int(headers["X-DRAIN-Total"])
        if "X-DRAIN-Cost" in headers:
            self.last_cost = int(headers["X-DRAIN-Cost"])
