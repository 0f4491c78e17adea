"""The consumer CLI's memory between commands: one channel's facts and the last voucher signed,
in a JSON file (0600, replaced whole on each write). It never holds the key: that comes from
CONSUMER_PRIVATE_KEY or a key file each time."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eth_account.signers.local import LocalAccount

from ..privatefile import write_private
from ..protocol import Domain
from .channel import DrainConsumer

DEFAULT_STATE = Path("drain-channel.json")


class StateError(Exception):
    """The state file is missing, unreadable, or of another key. Safe to show."""


@dataclass
class ChannelFile:
    path: Path
    facts: dict[str, Any]

    @property
    def closed(self) -> bool:
        return self.facts.get("status") == "closed"

    def consumer(self, account: LocalAccount) -> DrainConsumer:
        """The channel's consumer where the last command left it; the key must be its own."""
        facts = self.facts
        if str(facts.get("consumer", "")).lower() != str(account.address).lower():
            raise StateError(f"{self.path}: the channel's consumer is {facts.get('consumer')}, not this key's address")
        return DrainConsumer(
            account=account,
            domain=Domain(int(facts["chainId"]), facts["contract"]),
            channel_id=facts["channelId"],
            deposit=int(facts["deposit"]),
            nonce=int(facts.get("lastNonce", 0)),
            amount=int(facts.get("lastAmount", 0)),
            charged=int(facts.get("charged", 0)),
            next_min=int(facts.get("nextMin", 0)),
            api=facts["api"],
            expiry=int(facts.get("expiry", 0)),
        )

    def update(self, consumer: DrainConsumer, **extra: Any) -> None:
        self.facts.update(
            lastNonce=str(consumer.nonce),
            lastAmount=str(consumer.amount),
            charged=str(consumer.charged),
            nextMin=str(consumer.next_min),
            **extra,
        )
        self.save()

    def save(self) -> None:
        write_private(self.path, json.dumps(self.facts, indent=2) + "\n")


def new_state(path: Path, consumer: DrainConsumer, *, provider: str, status: str = "open") -> ChannelFile:
    state = ChannelFile(
        path,
        {
            "api": consumer.api,
            "chainId": consumer.domain.chain_id,
            "contract": consumer.domain.verifying_contract,
            "channelId": consumer.channel_id,
            "consumer": consumer.address,
            "provider": provider,
            "deposit": str(consumer.deposit),
            "expiry": consumer.expiry,
            "status": status,
        },
    )
    state.update(consumer)
    return state


def load_state(path: Path) -> ChannelFile | None:
    """The state at `path`, None if there is none."""
    try:
        facts = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StateError(f"{path}: not a readable channel state ({type(exc).__name__})") from None
    required = ("api", "chainId", "contract", "channelId", "consumer", "deposit")
    if not isinstance(facts, dict) or any(key not in facts for key in required):
        raise StateError(f"{path}: not a channel state of this kit")
    return ChannelFile(path, facts)
