"""DRAIN protocol facts and pure functions.

Everything here is deterministic and free of I/O so that the rules a voucher must meet can be
tested without a server or a chain. Nothing in this module imports the rest of the package.

The EIP-712 digests are computed by hand (a few keccak calls over 32-byte words) rather than
through eth-account's generic typed-data encoder: it is the hot path of every paid request, and a
test pins the two to the same bytes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from coincurve import PublicKey
from eth_hash.auto import keccak as eth_keccak
from eth_keys.datatypes import PrivateKey
from eth_utils.address import to_checksum_address

try:  # the C keccak of safe-pysha3: about 1 us a hash, against 8 us through eth-hash's pycryptodome
    from sha3 import keccak_256
except ImportError:  # pragma: no cover (platforms without a safe-pysha3 wheel)
    keccak_256 = None


def keccak(data: bytes) -> bytes:
    if keccak_256 is not None:
        return bytes(keccak_256(data).digest())
    return eth_keccak(data)


UINT256_MAX = 2**256 - 1
ZERO_ADDRESS = "0x0000000000000000000000000000000000000000"

# secp256k1 group order; the contract (like OpenZeppelin's ECDSA) refuses s above half of it.
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
SECP256K1_HALF_N = SECP256K1_N // 2

DOMAIN_NAME = "DrainChannel"
DOMAIN_VERSION = "1"

EIP712_DOMAIN_TYPE = "EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
VOUCHER_TYPE = "Voucher(bytes32 channelId,uint256 amount,uint256 nonce)"
CLOSE_AUTHORIZATION_TYPE = "CloseAuthorization(bytes32 channelId,uint256 finalAmount)"
# Ours, not the contract's: a consumer proves to the provider that a request about its channel
# (reading its usage, asking to close it) comes from it. `action` keeps a signature for one from
# being replayed as the other; `timestamp` (unix seconds) keeps it from being replayed later.
CONSUMER_REQUEST_TYPE = "ConsumerRequest(bytes32 channelId,string action,uint256 timestamp)"

EIP712_DOMAIN_TYPEHASH = keccak(EIP712_DOMAIN_TYPE.encode())
VOUCHER_TYPEHASH = keccak(VOUCHER_TYPE.encode())
CLOSE_AUTHORIZATION_TYPEHASH = keccak(CLOSE_AUTHORIZATION_TYPE.encode())
CONSUMER_REQUEST_TYPEHASH = keccak(CONSUMER_REQUEST_TYPE.encode())

# The same types in the JSON shape wallets and eth-account take (served by GET /v1/signing).
EIP712_TYPES: dict[str, list[dict[str, str]]] = {
    "EIP712Domain": [
        {"name": "name", "type": "string"},
        {"name": "version", "type": "string"},
        {"name": "chainId", "type": "uint256"},
        {"name": "verifyingContract", "type": "address"},
    ],
    "Voucher": [
        {"name": "channelId", "type": "bytes32"},
        {"name": "amount", "type": "uint256"},
        {"name": "nonce", "type": "uint256"},
    ],
    "CloseAuthorization": [
        {"name": "channelId", "type": "bytes32"},
        {"name": "finalAmount", "type": "uint256"},
    ],
    "ConsumerRequest": [
        {"name": "channelId", "type": "bytes32"},
        {"name": "action", "type": "string"},
        {"name": "timestamp", "type": "uint256"},
    ],
}


@dataclass(frozen=True)
class Deployment:
    chain_name: str
    v1: str
    v2: str
    usdc: str
    default_rpc_url: str


# docs/PROTOCOL.md, "The contract": the public deployments clients know about.
DEPLOYMENTS: dict[int, Deployment] = {
    137: Deployment(
        chain_name="Polygon",
        v1="0x1C1918C99b6DcE977392E4131C91654d8aB71e64",
        v2="0x0C2B3aA1e80629D572b1f200e6DF3586B3946A8A",
        usdc="0x3c499c542cEF5E3811e1192ce70d8cC03d5c3359",
        default_rpc_url="https://polygon-rpc.com",
    ),
    80002: Deployment(
        chain_name="Polygon Amoy",
        v1="0x61f1C1E04d6Da1C92D0aF1a3d7Dc0fEFc8794d7C",
        v2="0x73d16E39f0e4C0BFB8b3e41a2f721eCC0EDEF74F",
        usdc="0x41E94Eb019C0762f9Bfcf9Fb1E58725BfB0e7582",
        default_rpc_url="https://rpc-amoy.polygon.technology",
    ),
}


@dataclass(frozen=True)
class ContractRef:
    """One DrainChannel deployment a provider serves channels of; its version decides what it
    can do."""

    address: str  # EIP-55
    version: str  # "v1" or "v2"

    @property
    def cooperative_close(self) -> bool:
        """Only V2 has `cooperativeClose` (and a protocol fee)."""
        return self.version == "v2"


@dataclass(frozen=True)
class ChannelState:
    """The contract's `Channel` struct as read from chain."""

    consumer: str
    provider: str
    deposit: int
    claimed: int
    expiry: int

    @property
    def exists(self) -> bool:
        """A closed channel is deleted on chain: its consumer reads back as the zero address."""
        return self.consumer != ZERO_ADDRESS


@dataclass(frozen=True)
class ChannelClose:
    """A channel's end on chain (its ChannelClosed event), with what that transaction paid the
    provider. Either way of closing leaves the provider with deposit - refund in total."""

    channel_id: str
    refund: int  # to the consumer
    payout: int  # to the provider by the same transaction (a cooperative close), before the fee
    fee: int  # the protocol fee taken from that payout (V2; 0 on V1)
    cooperative: bool
    tx_hash: str
    block_number: int


@dataclass(frozen=True)
class ClaimPaid:
    """What one mined claim paid, from its receipt's ChannelClaimed and FeePaid events."""

    payout: int  # gross: the new claimed total minus the old
    fee: int  # to the protocol's fee recipient, out of the payout


class VoucherFormatError(ValueError):
    """The header is not a well-formed voucher. The message is safe to show to the client."""


@dataclass(frozen=True)
class Voucher:
    channel_id: str  # 0x + 64 lowercase hex
    amount: int
    nonce: int
    signature: bytes  # exactly 65 bytes: r || s || v

    @property
    def signature_hex(self) -> str:
        return "0x" + self.signature.hex()

    def to_json(self) -> dict[str, str]:
        """The header's JSON form, every number as a decimal string as clients send it."""
        return {
            "channelId": self.channel_id,
            "amount": str(self.amount),
            "nonce": str(self.nonce),
            "signature": self.signature_hex,
        }

    def header_value(self) -> str:
        return json.dumps(self.to_json(), separators=(",", ":"))


VOUCHER_HEADER = "X-DRAIN-Voucher"
MAX_VOUCHER_HEADER_BYTES = 1024
_VOUCHER_KEYS = frozenset({"channelId", "amount", "nonce", "signature"})
_HEX = frozenset("0123456789abcdefABCDEF")
# The header as clients write it (JSON.stringify, keys in the documented order). It is a strict
# subset of what the full parser accepts and gives the same voucher, for a fifth of the time.
_CANONICAL_VOUCHER = re.compile(
    r'\{"channelId":"0x([0-9a-fA-F]{64})","amount":"(0|[1-9][0-9]{0,77})",'
    r'"nonce":"(0|[1-9][0-9]{0,77})","signature":"0x([0-9a-fA-F]{130})"\}'
)


def _hex_field(obj: dict[str, Any], key: str, n_bytes: int) -> str:
    value = obj[key]
    if not isinstance(value, str) or not value.startswith("0x"):
        raise VoucherFormatError(f"{key} must be a 0x-prefixed hex string")
    digits = value[2:]
    if len(digits) != 2 * n_bytes or not _HEX.issuperset(digits):
        raise VoucherFormatError(f"{key} must be 0x followed by {2 * n_bytes} hex digits")
    return "0x" + digits.lower()


def _uint256_field(obj: dict[str, Any], key: str) -> int:
    value = obj[key]
    # bool is an int subclass in Python; JSON true/false is never a number here.
    if isinstance(value, bool):
        raise VoucherFormatError(f"{key} must be a decimal string")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 78:
        if len(value) > 1 and value[0] == "0":
            raise VoucherFormatError(f"{key} must not have leading zeros")
        number = int(value)
    else:
        raise VoucherFormatError(f"{key} must be a decimal string of digits")
    if not 0 <= number <= UINT256_MAX:
        raise VoucherFormatError(f"{key} is outside the uint256 range")
    return number


def parse_voucher(header: str) -> Voucher:
    """Parse an X-DRAIN-Voucher header value strictly.

    Strict because whatever is accepted here is stored and later sent to the chain: exactly the
    four fields, exact types, no extras, no floats, no leading zeros, nothing outside uint256.
    """
    canonical = _CANONICAL_VOUCHER.fullmatch(header)
    if canonical is not None:
        channel_hex, amount_text, nonce_text, signature_hex = canonical.groups()
        amount, nonce = int(amount_text), int(nonce_text)
        if amount <= UINT256_MAX and nonce <= UINT256_MAX:
            return Voucher("0x" + channel_hex.lower(), amount, nonce, bytes.fromhex(signature_hex))
    if len(header.encode("utf-8", "surrogatepass")) > MAX_VOUCHER_HEADER_BYTES:
        raise VoucherFormatError("voucher header is too long")
    try:
        obj = json.loads(
            header, parse_float=_reject_float, parse_constant=_reject_float, object_pairs_hook=_no_duplicates
        )
    except ValueError as exc:  # the header's length bounds its nesting: no safejson needed
        if isinstance(exc, VoucherFormatError):
            raise
        raise VoucherFormatError("voucher header is not valid JSON") from None
    if not isinstance(obj, dict):
        raise VoucherFormatError("voucher must be a JSON object")
    keys_present = set(obj)
    if keys_present != _VOUCHER_KEYS:
        missing = sorted(_VOUCHER_KEYS - keys_present)
        extra = sorted(keys_present - _VOUCHER_KEYS)
        detail = []
        if missing:
            detail.append("missing " + ", ".join(missing))
        if extra:
            detail.append("unexpected " + ", ".join(extra)[:100])
        raise VoucherFormatError("voucher fields: " + "; ".join(detail))
    channel_id = _hex_field(obj, "channelId", 32)
    amount = _uint256_field(obj, "amount")
    nonce = _uint256_field(obj, "nonce")
    signature = bytes.fromhex(_hex_field(obj, "signature", 65)[2:])
    return Voucher(channel_id=channel_id, amount=amount, nonce=nonce, signature=signature)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise VoucherFormatError("duplicate fields in voucher")
    return dict(pairs)


def _reject_float(text: str) -> Any:
    raise VoucherFormatError("numbers must be integers (decimal strings)")


# --- EIP-712 ----------------------------------------------------------------------------------


def _word(value: int) -> bytes:
    return value.to_bytes(32, "big")


def _address_word(address: str) -> bytes:
    return bytes(12) + bytes.fromhex(address[2:])


@dataclass(frozen=True)
class Domain:
    """The EIP-712 domain of one DrainChannel deployment."""

    chain_id: int
    verifying_contract: str

    @property
    def separator(self) -> bytes:
        return keccak(
            EIP712_DOMAIN_TYPEHASH
            + keccak(DOMAIN_NAME.encode())
            + keccak(DOMAIN_VERSION.encode())
            + _word(self.chain_id)
            + _address_word(self.verifying_contract)
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "name": DOMAIN_NAME,
            "version": DOMAIN_VERSION,
            "chainId": self.chain_id,
            "verifyingContract": to_checksum_address(self.verifying_contract),
        }


def _typed_digest(domain_separator: bytes, struct_hash: bytes) -> bytes:
    return keccak(b"\x19\x01" + domain_separator + struct_hash)


def voucher_digest(domain_separator: bytes, channel_id: str, amount: int, nonce: int) -> bytes:
    struct_hash = keccak(VOUCHER_TYPEHASH + bytes.fromhex(channel_id[2:]) + _word(amount) + _word(nonce))
    return _typed_digest(domain_separator, struct_hash)


def close_authorization_digest(domain_separator: bytes, channel_id: str, final_amount: int) -> bytes:
    struct_hash = keccak(CLOSE_AUTHORIZATION_TYPEHASH + bytes.fromhex(channel_id[2:]) + _word(final_amount))
    return _typed_digest(domain_separator, struct_hash)


def consumer_request_digest(domain_separator: bytes, channel_id: str, action: str, timestamp: int) -> bytes:
    struct_hash = keccak(
        CONSUMER_REQUEST_TYPEHASH + bytes.fromhex(channel_id[2:]) + keccak(action.encode()) + _word(timestamp)
    )
    return _typed_digest(domain_separator, struct_hash)


def signature_well_formed(signature: bytes) -> bool:
    """Whether `signature` has the form the contract's ECDSA rules accept (see recover_address),
    before any recovery: 65 bytes, 0 < r < n, 0 < s <= n/2, v in {0, 1, 27, 28}."""
    if len(signature) != 65:
        return False
    r = int.from_bytes(signature[:32], "big")
    s = int.from_bytes(signature[32:64], "big")
    return signature[64] in (0, 1, 27, 28) and 0 < r < SECP256K1_N and 0 < s <= SECP256K1_HALF_N


def recover_address(digest: bytes, signature: bytes) -> bytes | None:
    """The 20-byte address that signed `digest`, or None where the contract would revert.

    Accepts exactly what the contract's ECDSA `tryRecover` accepts, so that we never refuse a
    voucher the chain would pay nor accept one it would refuse: 65 bytes (r, s, v); s at most
    half the curve order; v below 27 has 27 added, after which it must be 27 or 28 (so v = 0 and
    1 are valid, 2 to 26 are not); and ecrecover must find a signer, which it does not for r or
    s of 0 or r not below the order. This runs on every paid request, so it calls libsecp256k1
    (coincurve) directly: eth-keys' wrapper around the same call costs more than twice as much.
    """
    if not signature_well_formed(signature):
        return None
    v = signature[64]
    if v < 27:
        v += 27
    try:
        public_key = PublicKey.from_signature_and_message(signature[:64] + bytes([v - 27]), digest, hasher=None)
    except ValueError:  # no point on the curve has this r
        return None
    return bytes(keccak(public_key.format(compressed=False)[1:])[-20:])


def recover_signer(digest: bytes, signature: bytes) -> str | None:
    """The checksum address that signed `digest`, or None (see recover_address)."""
    address = recover_address(digest, signature)
    return None if address is None else str(to_checksum_address(address))


def sign_digest(private_key: bytes, digest: bytes) -> bytes:
    """A 65-byte r||s||v signature with v in {27, 28} and low s (eth-keys signs canonically)."""
    sig = PrivateKey(private_key).sign_msg_hash(digest)
    r: int = sig.r
    s: int = sig.s
    return r.to_bytes(32, "big") + s.to_bytes(32, "big") + bytes([sig.v + 27])


def sign_voucher(private_key: bytes, domain: Domain, channel_id: str, amount: int, nonce: int) -> Voucher:
    digest = voucher_digest(domain.separator, channel_id, amount, nonce)
    return Voucher(
        channel_id=channel_id.lower(), amount=amount, nonce=nonce, signature=sign_digest(private_key, digest)
    )


def channel_id_for(consumer: str, provider: str, timestamp: int, consumer_nonce: int) -> str:
    """keccak256(abi.encodePacked(consumer, provider, block.timestamp, nonces[consumer])): the id
    `open` assigns, so a client can know its channel id from the receipt's block."""
    packed = bytes.fromhex(consumer[2:]) + bytes.fromhex(provider[2:]) + _word(timestamp) + _word(consumer_nonce)
    return "0x" + keccak(packed).hex()


def parse_usdc(text: str, *, whole_digits: int = 15) -> int | None:
    """A decimal USDC amount as base units, exactly, without floats: "0.0075" -> 7500, "2" ->
    2000000; None for anything else (a sign, more than 6 decimals, more whole digits)."""
    match = re.fullmatch(rf"(\d{{1,{whole_digits}}})(?:\.(\d{{1,6}}))?", text)
    if match is None:
        return None
    whole, fraction = match.groups()
    return int(whole) * 1_000_000 + int((fraction or "").ljust(6, "0"))


def format_usdc(base_units: int) -> str:
    """Base units as a decimal USDC string without floats: 7500 -> "0.0075", 2000000 -> "2"."""
    sign = "-" if base_units < 0 else ""
    whole, frac = divmod(abs(base_units), 1_000_000)
    frac_text = f"{frac:06d}".rstrip("0")
    return f"{sign}{whole}.{frac_text}" if frac_text else f"{sign}{whole}"


# Each message with what a client fills in: GET /v1/signing serves them, one object per message
# and contract, ready for signTypedData once `message` is filled. Numbers are decimal strings
# (JSON has no uint256; viem, ethers and eth-account all take them).
MESSAGE_TEMPLATES: dict[str, dict[str, str]] = {
    "Voucher": {"channelId": "0x" + "00" * 32, "amount": "0", "nonce": "0"},
    "ConsumerRequest": {"channelId": "0x" + "00" * 32, "action": "close", "timestamp": "0"},
    "CloseAuthorization": {"channelId": "0x" + "00" * 32, "finalAmount": "0"},
}


def typed_data(domain: Domain, primary_type: str, message: dict[str, Any] | None = None) -> dict[str, Any]:
    """One EIP-712 message as wallets take it (`eth_signTypedData_v4`, viem's `signTypedData`,
    eth-account's `full_message`): its types hold the domain's and this message's only, since a
    second message type makes the primary type ambiguous to eth-account and ethers. ethers v6
    refuses `EIP712Domain` among the types it is given (it derives it from the domain), so
    `ethersTypes` holds the message's type alone: `signTypedData(domain, ethersTypes, message)`."""
    return {
        "domain": domain.as_json(),
        "types": {"EIP712Domain": EIP712_TYPES["EIP712Domain"], primary_type: EIP712_TYPES[primary_type]},
        "primaryType": primary_type,
        "message": dict(MESSAGE_TEMPLATES[primary_type] if message is None else message),
        "ethersTypes": {primary_type: EIP712_TYPES[primary_type]},
    }
