"""Our signatures and the contract's ecrecover agree: vouchers the provider accepts are
claimable on chain, and vouchers it refuses for their domain are refused by the chain too."""

from __future__ import annotations

import openai
import pytest
from eth_account import Account
from helpers import ChannelFactory, Provider, paid_chat

from drain_provider.chain import ContractReverted
from drain_provider.devtools.devchain import DevChain
from drain_provider.protocol import Domain, Voucher, recover_signer, sign_voucher, voucher_digest


async def test_accepted_voucher_is_claimed_on_chain(
    provider: Provider, open_channel: ChannelFactory, chain: DevChain
) -> None:
    consumer = await open_channel(provider)
    for _ in range(3):
        await paid_chat(provider.client(), consumer)
    record = await provider.ledger.get_channel(consumer.channel_id)
    assert record is not None and record.last_amount == consumer.amount
    amount, nonce, signature = (
        await provider.ledger.fetchone(
            "SELECT amount, nonce, signature FROM vouchers WHERE channel_id = ? ORDER BY id DESC LIMIT 1",
            (consumer.channel_id,),
        )
        or ()
    )
    stored = Voucher(consumer.channel_id, amount, int(nonce), bytes.fromhex(signature[2:]))
    before = await chain.usdc_balance(provider.address)
    held = await chain.usdc_balance(chain.contract)  # every channel of the session's chain
    client = chain.client()
    result = await client.claim(Account.from_key(provider.settings.provider_private_key), stored)
    assert result.succeeded
    assert await chain.usdc_balance(provider.address) == before + amount
    on_chain = await client.get_channel(consumer.channel_id)
    assert on_chain.claimed == amount
    assert await chain.usdc_balance(chain.contract) == held - amount


@pytest.mark.rule(1)
async def test_v_0_or_1_voucher_is_accepted_and_claimed_on_chain(
    provider: Provider, open_channel: ChannelFactory, chain: DevChain
) -> None:
    """The contract adds 27 to a v below 27, so a wallet's v = 0/1 signature pays: we accept it,
    store it as sent, and the claimer's claim of that very signature is paid on chain."""
    consumer = await open_channel(provider)
    signed = consumer.next_voucher(100_000)
    v = signed.signature[64]
    assert v in (27, 28)
    voucher = Voucher(signed.channel_id, signed.amount, signed.nonce, signed.signature[:64] + bytes([v - 27]))
    raw = await provider.client().chat.completions.with_raw_response.create(
        model="demo",
        messages=[{"role": "user", "content": "hi"}],
        extra_headers={"X-DRAIN-Voucher": voucher.header_value()},
    )
    assert raw.parse().choices[0].message.content
    assert 0 < int(raw.headers["X-DRAIN-Cost"]) == int(raw.headers["X-DRAIN-Total"])
    stored = await provider.ledger.fetchone(
        "SELECT signature FROM vouchers WHERE channel_id = ?", (consumer.channel_id,)
    )
    assert stored == (voucher.signature_hex,)

    before = await chain.usdc_balance(provider.address)
    (outcome,) = await provider.claimer.cycle(force=True)
    assert (outcome.status, outcome.amount) == ("confirmed", voucher.amount)
    assert (await chain.client().get_channel(consumer.channel_id)).claimed == voucher.amount
    assert await chain.usdc_balance(provider.address) == before + voucher.amount


@pytest.mark.parametrize("wrong", ["chain id", "contract"])
@pytest.mark.rule(1)
async def test_wrong_domain_is_refused_by_us_and_by_the_chain(
    provider: Provider, open_channel: ChannelFactory, chain: DevChain, wrong: str
) -> None:
    consumer = await open_channel(provider)
    domain = consumer.domain
    bad_domain = (
        Domain(domain.chain_id + 1, domain.verifying_contract)
        if wrong == "chain id"
        else Domain(domain.chain_id, chain.token)
    )
    voucher = sign_voucher(consumer.account.key, bad_domain, consumer.channel_id, 50_000, 1)
    # Under the provider's own domain the signature recovers to somebody else.
    digest = voucher_digest(provider.domain.separator, voucher.channel_id, voucher.amount, voucher.nonce)
    assert recover_signer(digest, voucher.signature) != consumer.address
    with pytest.raises(openai.APIStatusError) as info:
        await provider.client().chat.completions.create(
            model="demo",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"X-DRAIN-Voucher": voucher.header_value()},
        )
    assert info.value.response.headers["X-DRAIN-Error"] == "invalid_signature"
    with pytest.raises(ContractReverted) as reverted:
        await chain.client().claim(Account.from_key(provider.settings.provider_private_key), voucher)
    assert reverted.value.error == "InvalidSignature"
    assert (await chain.client().get_channel(consumer.channel_id)).claimed == 0
