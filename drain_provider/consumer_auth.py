"""A consumer's signed request about its own channel (docs/PROTOCOL.md, "The consumer's signed
request"). Pure: tested without a server or a chain.

Channel ids are public on chain, so whoever knows one could read a channel's usage or ask for
its close. A ConsumerRequest(channelId, action, timestamp), signed by the channel's consumer
under the EIP-712 domain of the channel's contract, shows the request comes from the consumer:
`action` keeps a signature for one thing ("usage") from being used for another ("close"), and
`timestamp`, within MAX_SKEW seconds of the server's clock, keeps it from being used much later.
"""

from __future__ import annotations

from dataclasses import dataclass

from .protocol import consumer_request_digest, recover_address

MAX_SKEW = 300  # seconds either side of the server's clock
ACTIONS = frozenset({"close", "usage"})
_HEX = frozenset("0123456789abcdefABCDEF")


class ConsumerRequestError(ValueError):
    """The signed request is malformed, stale or not the consumer's; the message is safe to show."""


@dataclass(frozen=True)
class SignedRequest:
    timestamp: int  # unix seconds
    signature: bytes  # 65 bytes: r || s || v


def _timestamp(value: object) -> int:
    if isinstance(value, bool):  # JSON true is an int in Python, never a timestamp
        raise ConsumerRequestError("timestamp must be unix seconds, an integer or a decimal string")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 20:
        return int(value)
    raise ConsumerRequestError("timestamp must be unix seconds, an integer or a decimal string")


def _signature(value: object) -> bytes:
    if not isinstance(value, str) or not value.startswith("0x") or len(value) != 132 or not _HEX.issuperset(value[2:]):
        raise ConsumerRequestError("signature must be 0x followed by 130 hex digits (65 bytes: r, s, v)")
    return bytes.fromhex(value[2:])


def parse_signed_request(timestamp: object, signature: object) -> SignedRequest | None:
    """The request's timestamp and signature (None when neither is given). One without the
    other, or either malformed, is a ConsumerRequestError: what is given must be valid."""
    if timestamp is None and signature is None:
        return None
    if timestamp is None or signature is None:
        raise ConsumerRequestError("timestamp and signature go together: send both, or neither")
    return SignedRequest(_timestamp(timestamp), _signature(signature))


def check_signed_request(
    request: SignedRequest, *, separator: bytes, channel_id: str, action: str, consumer: str, now: float
) -> None:
    """Raise ConsumerRequestError unless `request` is `consumer`'s ConsumerRequest for `action`
    on `channel_id`, under the domain whose separator is `separator`, and recent (`now`: the
    server's clock)."""
    assert action in ACTIONS
    if abs(request.timestamp - now) > MAX_SKEW:
        raise ConsumerRequestError(
            f"timestamp {request.timestamp} is more than {MAX_SKEW} s from this server's clock ({int(now)}): "
            "sign a new request with the current unix time"
        )
    digest = consumer_request_digest(separator, channel_id, action, request.timestamp)
    signer = recover_address(digest, request.signature)
    if signer is None or signer != bytes.fromhex(consumer[2:]):
        raise ConsumerRequestError(
            f'not signed by the channel\'s consumer: sign ConsumerRequest(channelId, action "{action}", timestamp) '
            "under the EIP-712 domain of the channel's contract"
        )
