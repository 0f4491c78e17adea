"""What a client learns from a provider's public answers, pure: prices from `/v1/pricing`
(decimal USDC strings, read back into base units without floats), the contract from the 402
discovery headers or `/v1/signing`, and the API's base URL from whatever a user types."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from eth_utils.address import is_address, to_checksum_address

from .. import protocol
from ..pricing import ModelPrice


class DiscoveryError(ValueError):
    """A provider's answer is not what a DRAIN provider serves. Safe to show."""


def parse_usdc(text: str) -> int:
    """A decimal USDC amount ("0.0075", "10") in base units (7500, 10000000), exactly."""
    base_units = protocol.parse_usdc(text.strip())
    if base_units is None:
        raise DiscoveryError(f"not a USDC amount with at most 6 decimals: {text[:40]!r}")
    return base_units


def api_base(url: str) -> str:
    """The provider's API root, ending in /v1, from its URL with or without /v1."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise DiscoveryError("the provider URL must start with http:// or https://")
    return url if url.endswith("/v1") else url + "/v1"


def prices_from_pricing(answer: Any) -> dict[str, ModelPrice]:
    """The models of a `/v1/pricing` answer with their prices in base units per 1k tokens."""
    models = answer.get("models") if isinstance(answer, dict) else None
    if not isinstance(models, dict):
        raise DiscoveryError("/v1/pricing has no models")
    prices = {}
    for name, price in models.items():
        if isinstance(price, dict) and isinstance(price.get("inputPer1kTokens"), str):
            prices[name] = ModelPrice(parse_usdc(price["inputPer1kTokens"]), parse_usdc(price["outputPer1kTokens"]))
    return prices


def _address(value: Any, what: str) -> str:
    if not isinstance(value, str) or not is_address(value):
        raise DiscoveryError(f"{what} is not an address")
    return str(to_checksum_address(value))


@dataclass(frozen=True)
class ProviderFacts:
    """Who to open a channel to, where, and what its models cost."""

    api: str
    provider: str
    chain_id: int
    contract: str
    prices: dict[str, ModelPrice]
    min_duration: int  # seconds: a shorter channel is refused from the start


def provider_facts(api: str, pricing: Any, contract_source: Mapping[str, Any]) -> ProviderFacts:
    """From `/v1/pricing` and either a 402's discovery headers (`X-Payment-Contract`,
    `X-Payment-Chain`) or `/v1/signing` (`contract`, `chainId`)."""
    if not isinstance(pricing, dict):
        raise DiscoveryError("/v1/pricing is not a JSON object")
    contract = contract_source.get("X-Payment-Contract") or contract_source.get("contract")
    chain = contract_source.get("X-Payment-Chain") or contract_source.get("chainId")
    chain_id = pricing.get("chainId")
    if not isinstance(chain_id, int) or str(chain) != str(chain_id):
        raise DiscoveryError("the provider's chain id is missing or not the same in its answers")
    duration = pricing.get("minChannelDurationSeconds", 3601)
    return ProviderFacts(
        api=api,
        provider=_address(pricing.get("provider"), "the provider"),
        chain_id=chain_id,
        contract=_address(contract, "the contract"),
        prices=prices_from_pricing(pricing),
        min_duration=duration if isinstance(duration, int) else 3601,
    )
