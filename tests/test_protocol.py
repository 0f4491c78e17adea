"""Pins `drain_provider.protocol`, the pure DRAIN facts every paid request relies on.

- `parse_voucher` accepts exactly the header shape clients send and refuses every malformation
  with a `VoucherFormatError` (never another exception).
- The hand-rolled EIP-712 digests and domain separator are byte-identical to eth-account's
  generic typed-data encoder, and `sign_voucher` produces eth-account's exact signature.
- `recover_signer` follows the contract's ECDSA rules (65 bytes, low s, v in {27, 28} after
  adding 27 to a v below 27, so v in {0, 1, 27, 28}; r and s non-zero) and `sign_digest` only
  produces signatures the contract accepts.
- `channel_id_for` matches `keccak256(abi.encodePacked(...))`, and `format_usdc` is exact.
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from eth_abi.packed import encode_packed
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_hash.auto import keccak
from eth_keys.datatypes import Signature
from eth_utils.address import is_checksum_address

from drain_provider.protocol import (
    DEPLOYMENTS,
    EIP712_TYPES,
    MAX_VOUCHER_HEADER_BYTES,
    SECP256K1_HALF_N,
    SECP256K1_N,
    UINT256_MAX,
    Domain,
    Voucher,
    VoucherFormatError,
    channel_id_for,
    close_authorization_digest,
    consumer_request_digest,
    format_usdc,
    parse_voucher,
    recover_signer,
    sign_digest,
    sign_voucher,
    voucher_digest,
)

RNG_SEED = 20240601
CHANNEL = "0x" + "ab" * 32
SIGNATURE = "0x" + "11" * 64 + "1b"
KEY = bytes.fromhex("4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318")
DOMAIN = Domain(137, DEPLOYMENTS[137].v2)


def header(**overrides: Any) -> str:
    """A canonical voucher header with some fields replaced (a value of ... removes the field)."""
    fields: dict[str, Any] = {"channelId": CHANNEL, "amount": "1000000", "nonce": "1", "signature": SIGNATURE}
    fields.update(overrides)
    return json.dumps({k: v for k, v in fields.items() if v is not ...}, separators=(",", ":"))


def random_key(rng: random.Random) -> bytes:
    return rng.randrange(1, SECP256K1_N).to_bytes(32, "big")


def typed_data(domain: Domain, primary: str, message: dict[str, Any]) -> Any:
    types = {primary: EIP712_TYPES[primary]}
    return encode_typed_data(domain.as_json(), types, message)


def eth_account_digest(domain: Domain, primary: str, message: dict[str, Any]) -> bytes:
    """The EIP-712 digest as eth-account computes it (the hash it signs)."""
    return bytes(Account.sign_message(typed_data(domain, primary, message), KEY).message_hash)


# --- parse_voucher: accepted -----------------------------------------------------------------


def test_parse_canonical_header() -> None:
    assert parse_voucher(header()) == Voucher(CHANNEL, 1_000_000, 1, bytes.fromhex(SIGNATURE[2:]))


def test_parse_accepts_json_integers() -> None:
    voucher = parse_voucher(header(amount=1_000_000, nonce=7))
    assert (voucher.amount, voucher.nonce) == (1_000_000, 7)


def test_parse_normalises_uppercase_hex() -> None:
    voucher = parse_voucher(header(channelId="0x" + "AB" * 32, signature="0x" + "CD" * 65))
    assert voucher.channel_id == CHANNEL
    assert voucher.signature == bytes([0xCD]) * 65


@pytest.mark.parametrize("amount", ["0", str(UINT256_MAX), 0, UINT256_MAX])
def test_parse_accepts_uint256_bounds(amount: Any) -> None:
    assert parse_voucher(header(amount=amount)).amount == int(amount)


def test_parse_accepts_header_of_exactly_max_length() -> None:
    text = header()
    padded = text[:-1] + " " * (MAX_VOUCHER_HEADER_BYTES - len(text)) + "}"
    assert len(padded) == MAX_VOUCHER_HEADER_BYTES
    assert parse_voucher(padded).amount == 1_000_000


@pytest.mark.parametrize(
    ("amount", "nonce"),
    [("0", "1"), ("1000000", "7"), (str(UINT256_MAX), str(UINT256_MAX)), (str(UINT256_MAX + 1), "1"), ("01", "1")],
)
@pytest.mark.parametrize("hex_case", [str.lower, str.upper])
def test_the_compact_header_and_the_spaced_one_parse_alike(amount: str, nonce: str, hex_case: Any) -> None:
    """The compact form (what clients send) takes a fast path; it must agree with the full parser
    on every input, accepted or refused."""
    fields = {
        "channelId": "0x" + hex_case("ab" * 32),
        "amount": amount,
        "nonce": nonce,
        "signature": "0x" + hex_case("cd" * 65),
    }
    compact = json.dumps(fields, separators=(",", ":"))
    spaced = json.dumps(fields)
    outcomes: list[Voucher | str] = []
    for text in (compact, spaced):
        try:
            outcomes.append(parse_voucher(text))
        except VoucherFormatError as exc:
            outcomes.append(str(exc))
    assert outcomes[0] == outcomes[1]
    assert isinstance(outcomes[0], Voucher) == ((int(amount) <= UINT256_MAX and amount[0] != "0") or amount == "0")


def test_header_value_roundtrips() -> None:
    voucher = sign_voucher(KEY, DOMAIN, CHANNEL, 123_456, 9)
    assert parse_voucher(voucher.header_value()) == voucher
    assert json.loads(voucher.header_value())["amount"] == "123456"


# --- parse_voucher: refused ------------------------------------------------------------------

MALFORMED: dict[str, str] = {
    "not json": "channelId=0x1",
    "empty": "",
    "truncated": header()[:-1],
    "array": json.dumps([CHANNEL, "1", "1", SIGNATURE]),
    "string": json.dumps("voucher"),
    "number": "42",
    "null": "null",
    "missing amount": header(amount=...),
    "missing signature": header(signature=...),
    "extra key": header(extra="1"),
    "channelId too short": header(channelId="0x" + "ab" * 31),
    "channelId too long": header(channelId="0x" + "ab" * 33),
    "channelId no prefix": header(channelId="ab" * 32),
    "channelId 0X prefix": header(channelId="0X" + "ab" * 32),
    "channelId not hex": header(channelId="0x" + "zz" * 32),
    "channelId number": header(channelId=1),
    "amount float": header(amount=1.5),
    "amount float string": header(amount="1.5"),
    "amount exponent string": header(amount="1e6"),
    "amount exponent literal": header().replace('"1000000"', "1e6"),
    "amount leading zero literal": header().replace('"1000000"', "01"),
    "amount negative string": header(amount="-1"),
    "amount negative number": header(amount=-1),
    "amount true": header(amount=True),
    "amount false": header(amount=False),
    "amount null": header(amount=None),
    "amount empty": header(amount=""),
    "amount leading zero": header(amount="01"),
    "amount too large": header(amount=str(2**256)),
    "amount too large number": header(amount=2**256),
    "amount arabic-indic digits": header(amount="١٢٣"),
    "amount fullwidth digits": header(amount="１２３"),
    "amount leading space": header(amount=" 1"),
    "amount trailing space": header(amount="1 "),
    "amount plus sign": header(amount="+1"),
    "amount hex": header(amount="0x10"),
    "amount underscore": header(amount="1_000"),
    "nonce float": header(nonce=1.0),
    "nonce list": header(nonce=["1"]),
    "signature 64 bytes": header(signature="0x" + "11" * 64),
    "signature 66 bytes": header(signature="0x" + "11" * 66),
    "signature not hex": header(signature="0x" + "gg" * 65),
    "signature no prefix": header(signature="11" * 65),
    "NaN literal": header().replace('"1000000"', "NaN"),
    "Infinity literal": header().replace('"1000000"', "Infinity"),
    "-Infinity literal": header().replace('"1000000"', "-Infinity"),
    "too long": header()[:-1] + " " * MAX_VOUCHER_HEADER_BYTES + "}",
}


@pytest.mark.parametrize("text", MALFORMED.values(), ids=MALFORMED.keys())
def test_parse_rejects_malformed(text: str) -> None:
    with pytest.raises(VoucherFormatError):
        parse_voucher(text)


def test_parse_malformed_cases_differ_from_canonical_only_where_intended() -> None:
    """Guards the table above: the substitutions really changed the header."""
    canonical = header()
    assert all(text != canonical for text in MALFORMED.values())


def test_too_long_header_is_refused_before_parsing() -> None:
    with pytest.raises(VoucherFormatError, match="too long"):
        parse_voucher(header()[:-1] + " " * MAX_VOUCHER_HEADER_BYTES + "}")


# --- EIP-712 digests -------------------------------------------------------------------------

DOMAINS = [
    DOMAIN,
    Domain(80002, DEPLOYMENTS[80002].v1),
    Domain(1, "0x" + "00" * 19 + "01"),
    Domain(UINT256_MAX, "0x" + "ff" * 20),
]


@pytest.mark.parametrize("domain", DOMAINS, ids=lambda d: str(d.chain_id))
def test_domain_separator_matches_eth_account(domain: Domain) -> None:
    signable = typed_data(domain, "Voucher", {"channelId": bytes(32), "amount": 0, "nonce": 0})
    assert domain.separator == bytes(signable.header)


def test_domain_separator_depends_on_chain_and_contract() -> None:
    separators = {d.separator for d in DOMAINS}
    assert len(separators) == len(DOMAINS)


@pytest.mark.parametrize("domain", DOMAINS, ids=lambda d: str(d.chain_id))
def test_voucher_digest_matches_eth_account(domain: Domain) -> None:
    rng = random.Random(RNG_SEED)
    for amount, nonce in [(0, 0), (1, 1), (8250, 2), (UINT256_MAX, UINT256_MAX), (rng.getrandbits(256), 3)]:
        channel = "0x" + rng.randbytes(32).hex()
        message = {"channelId": bytes.fromhex(channel[2:]), "amount": amount, "nonce": nonce}
        assert voucher_digest(domain.separator, channel, amount, nonce) == eth_account_digest(
            domain, "Voucher", message
        )


@pytest.mark.parametrize("domain", DOMAINS, ids=lambda d: str(d.chain_id))
def test_close_authorization_digest_matches_eth_account(domain: Domain) -> None:
    rng = random.Random(RNG_SEED)
    for final_amount in [0, 1, 8250, UINT256_MAX, rng.getrandbits(256)]:
        channel = "0x" + rng.randbytes(32).hex()
        message = {"channelId": bytes.fromhex(channel[2:]), "finalAmount": final_amount}
        assert close_authorization_digest(domain.separator, channel, final_amount) == eth_account_digest(
            domain, "CloseAuthorization", message
        )


@pytest.mark.parametrize("domain", DOMAINS, ids=lambda d: str(d.chain_id))
def test_consumer_request_digest_matches_eth_account(domain: Domain) -> None:
    rng = random.Random(RNG_SEED)
    for action, timestamp in [("close", 0), ("usage", 1_800_000_000), ("", UINT256_MAX), ("é", rng.getrandbits(64))]:
        channel = "0x" + rng.randbytes(32).hex()
        message = {"channelId": bytes.fromhex(channel[2:]), "action": action, "timestamp": timestamp}
        assert consumer_request_digest(domain.separator, channel, action, timestamp) == eth_account_digest(
            domain, "ConsumerRequest", message
        )


def test_voucher_and_close_digests_differ() -> None:
    assert voucher_digest(DOMAIN.separator, CHANNEL, 5, 0) != close_authorization_digest(DOMAIN.separator, CHANNEL, 5)


def test_sign_voucher_equals_eth_account_signature() -> None:
    rng = random.Random(RNG_SEED)
    for _ in range(5):
        key, channel = random_key(rng), "0x" + rng.randbytes(32).hex()
        amount, nonce = rng.getrandbits(64), rng.getrandbits(16)
        message = {"channelId": bytes.fromhex(channel[2:]), "amount": amount, "nonce": nonce}
        expected = Account.sign_message(typed_data(DOMAIN, "Voucher", message), key).signature
        assert sign_voucher(key, DOMAIN, channel, amount, nonce).signature == bytes(expected)


def test_sign_voucher_lowercases_channel_id() -> None:
    voucher = sign_voucher(KEY, DOMAIN, "0x" + "AB" * 32, 1, 1)
    assert voucher.channel_id == CHANNEL


# --- signer recovery -------------------------------------------------------------------------


def signed(key: bytes = KEY, amount: int = 1000) -> tuple[bytes, bytes]:
    """(digest, signature) of a voucher on DOMAIN."""
    digest = voucher_digest(DOMAIN.separator, CHANNEL, amount, 1)
    return digest, sign_digest(key, digest)


def split(signature: bytes) -> tuple[int, int, int]:
    return int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:64], "big"), signature[64]


def join(r: int, s: int, v: int) -> bytes:
    return r.to_bytes(32, "big") + s.to_bytes(32, "big") + bytes([v])


def test_recover_roundtrip_with_sign_voucher() -> None:
    voucher = sign_voucher(KEY, DOMAIN, CHANNEL, 8250, 3)
    digest = voucher_digest(DOMAIN.separator, voucher.channel_id, voucher.amount, voucher.nonce)
    assert recover_signer(digest, voucher.signature) == Account.from_key(KEY).address


def test_recover_other_digest_gives_other_address() -> None:
    _, signature = signed(amount=1000)
    other_digest, _ = signed(amount=1001)
    assert recover_signer(other_digest, signature) != Account.from_key(KEY).address


def test_recover_rejects_high_s_malleation() -> None:
    digest, signature = signed()
    r, s, v = split(signature)
    malleated = join(r, SECP256K1_N - s, 55 - v)  # 27 <-> 28
    # the malleated signature is mathematically valid for the same signer ...
    twin = Signature(vrs=(55 - v - 27, r, SECP256K1_N - s)).recover_public_key_from_msg_hash(digest)
    assert twin.to_checksum_address() == Account.from_key(KEY).address
    # ... but the contract refuses it, and so must we
    assert recover_signer(digest, malleated) is None


@pytest.mark.rule(1)
def test_recover_accepts_v_0_and_1_like_the_contract() -> None:
    """The contract's tryRecover adds 27 to a v below 27: v - 27 is the same signature."""
    rng = random.Random(RNG_SEED)
    for _ in range(20):
        key, digest = random_key(rng), rng.randbytes(32)
        signature = sign_digest(key, digest)
        r, s, v = split(signature)
        address = Account.from_key(key).address
        assert recover_signer(digest, join(r, s, v - 27)) == recover_signer(digest, signature) == address
        # the other parity is another signer (or none), as with 27 <-> 28
        assert recover_signer(digest, join(r, s, 28 - v)) != address


@pytest.mark.rule(1)
@pytest.mark.parametrize("v", [*range(2, 27), 29, 30, 31, 53, 54, 128, 229, 255])
def test_recover_rejects_bad_v(v: int) -> None:
    digest, signature = signed()
    assert recover_signer(digest, signature[:64] + bytes([v])) is None


@pytest.mark.rule(1)
def test_recover_rejects_zero_r_or_s_with_v_0_or_1() -> None:
    digest, signature = signed()
    r, s, v = split(signature)
    assert recover_signer(digest, join(0, s, v - 27)) is None
    assert recover_signer(digest, join(r, 0, v - 27)) is None
    assert recover_signer(digest, join(r, SECP256K1_N - s, 28 - v)) is None  # high s, v 0/1


def test_recover_rejects_zero_r_or_s() -> None:
    digest, signature = signed()
    r, s, v = split(signature)
    assert recover_signer(digest, join(0, s, v)) is None
    assert recover_signer(digest, join(r, 0, v)) is None


def test_recover_rejects_r_at_or_above_order() -> None:
    digest, signature = signed()
    _, s, v = split(signature)
    assert recover_signer(digest, join(SECP256K1_N, s, v)) is None
    assert recover_signer(digest, join(2**256 - 1, s, v)) is None


def test_recover_returns_none_for_r_off_the_curve() -> None:
    digest, signature = signed()
    _, s, v = split(signature)
    assert recover_signer(digest, join(5, s, v)) is None  # x = 5: x^3 + 7 has no square root mod p


@pytest.mark.parametrize("length", [0, 64, 66, 130])
def test_recover_rejects_wrong_length(length: int) -> None:
    digest, signature = signed()
    assert recover_signer(digest, (signature * 2)[:length]) is None


def test_sign_digest_is_canonical_for_random_keys() -> None:
    rng = random.Random(RNG_SEED)
    for _ in range(50):
        key, digest = random_key(rng), rng.randbytes(32)
        signature = sign_digest(key, digest)
        r, s, v = split(signature)
        assert len(signature) == 65
        assert v in (27, 28)
        assert 0 < s <= SECP256K1_HALF_N
        assert 0 < r < SECP256K1_N
        assert recover_signer(digest, signature) == Account.from_key(key).address


# --- channel ids, money formatting, error codes ---------------------------------------------


def test_channel_id_matches_abi_encode_packed() -> None:
    rng = random.Random(RNG_SEED)
    for _ in range(5):
        consumer = Account.from_key(random_key(rng)).address
        provider = Account.from_key(random_key(rng)).address
        timestamp, nonce = rng.getrandbits(40), rng.getrandbits(8)
        packed = encode_packed(["address", "address", "uint256", "uint256"], [consumer, provider, timestamp, nonce])
        assert channel_id_for(consumer, provider, timestamp, nonce) == "0x" + keccak(packed).hex()


def test_channel_id_is_lowercase_bytes32() -> None:
    channel = channel_id_for("0x" + "AB" * 20, "0x" + "cd" * 20, 1, 0)
    assert len(channel) == 66 and channel == channel.lower()


@pytest.mark.parametrize(
    ("base_units", "text"),
    [
        (7500, "0.0075"),
        (22500, "0.0225"),
        (0, "0"),
        (1, "0.000001"),
        (10, "0.00001"),
        (1_000_000, "1"),
        (1_500_000, "1.5"),
        (2_000_000, "2"),
        (123_456_789, "123.456789"),
        (-7500, "-0.0075"),
        (-1_500_000, "-1.5"),
        (UINT256_MAX, f"{UINT256_MAX // 10**6}.{UINT256_MAX % 10**6:06d}".rstrip("0")),
    ],
)
def test_format_usdc(base_units: int, text: str) -> None:
    assert format_usdc(base_units) == text


@pytest.mark.parametrize("chain_id", sorted(DEPLOYMENTS))
def test_every_known_address_is_eip55(chain_id: int) -> None:
    """What we print of them must pass viem's checksum check (the Amoy V2 address once did not)."""
    deployment = DEPLOYMENTS[chain_id]
    for address in (deployment.v1, deployment.v2, deployment.usdc):
        assert is_checksum_address(address), address
