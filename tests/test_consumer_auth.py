"""The consumer's signed request (consumer_auth.py) and the close's final amount (closing.py),
pure: the forms accepted, the clock's window, the action bound in the signature."""

from __future__ import annotations

from typing import Any

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data

from drain_provider.closing import final_amount
from drain_provider.consumer_auth import (
    MAX_SKEW,
    ConsumerRequestError,
    SignedRequest,
    check_signed_request,
    parse_signed_request,
)
from drain_provider.ledger import CloseFigures
from drain_provider.protocol import DEPLOYMENTS, EIP712_TYPES, Domain

DOMAIN = Domain(80002, DEPLOYMENTS[80002].v2)
CHANNEL = "0x" + "5a" * 32
CONSUMER = Account.create()
NOW = 1_800_000_000


def signed(action: str, timestamp: int = NOW, account: Any = CONSUMER) -> SignedRequest:
    """Signed as a wallet would, with eth-account's generic EIP-712 encoder."""
    message = {"channelId": bytes.fromhex(CHANNEL[2:]), "action": action, "timestamp": timestamp}
    typed = encode_typed_data(DOMAIN.as_json(), {"ConsumerRequest": EIP712_TYPES["ConsumerRequest"]}, message)
    signature = "0x" + bytes(Account.sign_message(typed, account.key).signature).hex()
    parsed = parse_signed_request(str(timestamp), signature)
    assert parsed is not None
    return parsed


def check(request: SignedRequest, action: str = "close", now: float = NOW) -> None:
    check_signed_request(
        request, separator=DOMAIN.separator, channel_id=CHANNEL, action=action, consumer=CONSUMER.address, now=now
    )


def test_a_wallet_signature_is_accepted_within_the_window() -> None:
    for skew in (0, MAX_SKEW, -MAX_SKEW):
        check(signed("close", NOW + skew))
    check(signed("usage"), "usage")


@pytest.mark.parametrize(
    ("request_", "action", "now"),
    [
        (lambda: signed("usage"), "close", NOW),  # one action's signature for another
        (lambda: signed("close", NOW - MAX_SKEW - 1), "close", NOW),
        (lambda: signed("close", NOW + MAX_SKEW + 1), "close", NOW),
        (lambda: signed("close", account=Account.create()), "close", NOW),
    ],
    ids=["other action", "stale", "ahead", "other signer"],
)
def test_refused(request_: Any, action: str, now: float) -> None:
    with pytest.raises(ConsumerRequestError):
        check(request_(), action, now)


def test_the_forms() -> None:
    assert parse_signed_request(None, None) is None
    good = "0x" + "11" * 65
    assert parse_signed_request(NOW, good) == SignedRequest(NOW, bytes.fromhex("11" * 65))
    for timestamp, signature in [
        (NOW, None),
        (None, good),
        (True, good),
        (1.5, good),
        ("1e9", good),
        ("-5", good),
        ("9" * 21, good),
        (NOW, "11" * 65),
        (NOW, good[:-2]),
        (NOW, "0x" + "zz" * 65),
        (NOW, 5),
    ]:
        with pytest.raises(ConsumerRequestError):
            parse_signed_request(timestamp, signature)


def test_a_huge_or_negative_timestamp_is_stale_not_a_crash() -> None:
    for timestamp in (2**300, -1):
        with pytest.raises(ConsumerRequestError, match="clock"):
            check(SignedRequest(timestamp, bytes(65)))


@pytest.mark.rule(10)
def test_the_final_amount_is_never_below_what_the_chain_may_hold() -> None:
    figures = CloseFigures(deposit=10_000, charged=700, claimed=500, claiming=0)
    assert final_amount(figures, chain_claimed=500) == 700  # what was earned, not what was signed
    assert final_amount(figures, chain_claimed=900) == 900  # a claim landed since the last sync
    assert final_amount(CloseFigures(10_000, 700, 500, 1_200), chain_claimed=500) == 1_200  # one in flight
    assert final_amount(CloseFigures(1_000, 700, 500, 0), chain_claimed=5_000) == 1_000  # never above the deposit
