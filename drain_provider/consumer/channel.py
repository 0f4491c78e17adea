"""A small DRAIN client: open a channel, sign the next voucher, read costs back.

Used by `dev` mode, the tests, the consumer CLI and anyone who wants to pay a provider from
Python (it is a client, not part of the server):

    consumer = await DrainConsumer.open_channel(rpc_url, contract, key, provider, deposit=10_000_000)
    voucher = consumer.voucher_for(body, price)
    response = client.chat.completions.with_raw_response.create(
        **body, extra_headers={"X-DRAIN-Voucher": voucher.header_value()})
    consumer.record(response.headers)

(or let `drain_provider.consumer.http.drain_http_client` do the signing and the recording for
every request of an openai SDK client).

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
from web3 import AsyncWeb3

from .. import openai_format
from ..pricing import ModelPrice
from ..protocol import Domain, Voucher, sign_voucher
from ..tokens import TokenCounter
from .onchain import ConsumerChain

# The provider's defaults (DEFAULT_MAX_TOKENS, MIN_OUTPUT_TOKENS): what it reserves for a
# request without max_tokens, and the least output a voucher must leave room for.
DEFAULT_MAX_TOKENS = 4096
MIN_OUTPUT_TOKENS = 16


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
    expiry: int = 0  # unix seconds (chain time), when known

    @property
    def address(self) -> str:
        return str(self.account.address)

    @property
    def remaining(self) -> int:
        """What the deposit still pays for, as the provider last reported (X-DRAIN-Remaining)."""
        return self.deposit - self.charged

    @classmethod
    async def open_channel(
        cls,
        web3: AsyncWeb3[Any] | str,
        contract: str,
        private_key: bytes | str,
        provider: str,
        *,
        deposit: int,
        duration: int = 86_400,
        token: str | None = None,
    ) -> DrainConsumer:
        """approve + open on the DrainChannel `contract`, through `web3` (an AsyncWeb3, or a
        JSON-RPC URL); the token is the contract's `usdc()` unless given. The channel id is
        read from the receipt's ChannelOpened event."""
        account: LocalAccount = Account.from_key(private_key)
        chain = ConsumerChain.connect(web3, contract, account)
        try:
            opened = await chain.open(provider, deposit, duration, token=token)
            domain = Domain(await chain.chain_id(), chain.address)
        finally:
            await chain.close()
        return cls(account=account, domain=domain, channel_id=opened.channel_id, deposit=deposit, expiry=opened.expiry)

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

    def worst_case(
        self,
        body: dict[str, Any],
        price: ModelPrice,
        *,
        chat: bool = True,
        min_output_tokens: int = MIN_OUTPUT_TOKENS,
        default_max_tokens: int = DEFAULT_MAX_TOKENS,
    ) -> int:
        """The most the completion `body` may cost at `price`, as the provider reserves it:
        input counted as it counts it, plus `max_tokens` (or `default_max_tokens`, the
        provider's DEFAULT_MAX_TOKENS, when the body sets none). `chat` False: /v1/completions.
        Raises openai_format.RequestError for a body the provider would refuse."""
        model = body.get("model")
        prices = {model: price} if isinstance(model, str) else {}
        if chat:
            request = openai_format.parse_chat(body, prices, default_max_tokens=default_max_tokens)
        else:
            request = openai_format.parse_legacy(body, prices)
        return request.plan(request.input_tokens(_counter()), min_output_tokens).worst_case

    def voucher_covering(self, cost: int) -> Voucher:
        """A voucher for the charged total plus `cost`: never below the last amount nor
        X-DRAIN-Next-Min (the provider refuses less), never above the deposit."""
        return self.sign(min(max(self.amount, self.next_min, self.charged + cost), self.deposit))

    def voucher_for(
        self,
        body: dict[str, Any],
        price: ModelPrice,
        *,
        in_flight: int = 0,
        chat: bool = True,
        min_output_tokens: int = MIN_OUTPUT_TOKENS,
        default_max_tokens: int = DEFAULT_MAX_TOKENS,
    ) -> Voucher:
        """The exact voucher for the completion `body` at `price`: the charged total plus the
        request's worst case, plus `in_flight`, the worst cases of this channel's requests
        still running (the provider holds their reservations until they end)."""
        worst_case = self.worst_case(
            body, price, chat=chat, min_output_tokens=min_output_tokens, default_max_tokens=default_max_tokens
        )
        return self.voucher_covering(in_flight + worst_case)

    def record(self, headers: Mapping[str, str]) -> None:
        """Take the provider's figures from a paid response's headers (or a stream's comment
        lines). The charged total only grows: answers of concurrent requests may come out of
        order."""
        if "X-DRAIN-Next-Min" in headers:
            self.next_min = int(headers["X-DRAIN-Next-Min"])
        if "X-DRAIN-Total" in headers:
            self.charged = max(self.charged, int(headers["X-DRAIN-Total"]))
        if "X-DRAIN-Cost" in headers:
            self.last_cost = int(headers["X-DRAIN-Cost"])
