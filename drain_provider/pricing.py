"""Per-model prices and the integer cost arithmetic.

Prices are USDC base units (10^-6 USDC) per 1,000 tokens. Every function is pure integer math:
money never passes through a float.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from pathlib import Path


@dataclass(frozen=True)
class ModelPrice:
    input_per_1k: int
    output_per_1k: int


# The reference provider's defaults: OpenAI's launch list prices with a 50% markup (gpt-4o: $0.005 -> 7500).
DEFAULT_PRICES: dict[str, ModelPrice] = {
    "gpt-4o": ModelPrice(7500, 22500),
    "gpt-4o-mini": ModelPrice(225, 900),
    "gpt-4-turbo": ModelPrice(15000, 45000),
    "gpt-3.5-turbo": ModelPrice(750, 2250),
}


def cost(price: ModelPrice, input_tokens: int, output_tokens: int) -> int:
    """The reference provider's formula: floor division per part, so 500 in / 200 out on gpt-4o is 8250."""
    return input_tokens * price.input_per_1k // 1000 + output_tokens * price.output_per_1k // 1000


def affordable_output_tokens(price: ModelPrice, budget: int, input_tokens: int) -> int | None:
    """The most output tokens `budget` pays for after the input, -1 if it does not cover the
    input, None if output is free (no limit from price)."""
    rest = budget - input_tokens * price.input_per_1k // 1000
    if rest < 0:
        return -1
    if price.output_per_1k == 0:
        return None
    # n * p // 1000 <= rest  <=>  n * p < (rest + 1) * 1000
    return ((rest + 1) * 1000 - 1) // price.output_per_1k


def env_names(model: str) -> tuple[str, ...]:
    """Environment variable stems that may price `model`.

    The canonical stem upper-cases the name and turns every non-alphanumeric run into `_`
    (gpt-4o -> GPT_4O). The reference provider's README writes PRICE_GPT4O_INPUT, so the stem with those
    characters dropped is accepted too.
    """
    upper = model.upper()
    canonical = re.sub(r"[^A-Z0-9]", "_", upper)
    compact = re.sub(r"[^A-Z0-9]", "", upper)
    return (canonical,) if canonical == compact else (canonical, compact)


class PricingError(ValueError):
    """A price setting is wrong; the message names the variable or file and the problem, never
    the value (nor the file's path): a secret on the wrong line must not reach a log."""


def parse_price_value(name: str, raw: object) -> int:
    if isinstance(raw, int) and not isinstance(raw, bool):
        value = raw
    else:
        text = raw.strip() if isinstance(raw, str) else ""
        if not (text.isascii() and text.isdigit() and len(text) <= 19):
            raise PricingError(f"{name}: must be a whole number of USDC base units per 1k tokens (7500 = $0.0075)")
        value = int(text)
    if value < 0 or value >= 2**63:
        raise PricingError(f"{name}: out of range")
    return value


def load_pricing_file(path: Path) -> dict[str, ModelPrice]:
    """A JSON object {"model": {"input": 7500, "output": 22500}, ...} that adds or replaces models.

    Model names are quoted in errors: they are what /v1/models publishes."""
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise PricingError(f"PRICING_FILE: cannot read the file ({exc.strerror})") from None
    except ValueError:
        raise PricingError("PRICING_FILE: the file is not valid JSON") from None
    if not isinstance(data, dict):
        raise PricingError('PRICING_FILE: the file must hold an object {"model": {"input": N, "output": N}}')
    prices: dict[str, ModelPrice] = {}
    for model, entry in data.items():
        if not isinstance(entry, dict) or set(entry) != {"input", "output"}:
            raise PricingError(f'PRICING_FILE: model {model!r} needs exactly "input" and "output"')
        where = f"PRICING_FILE: {model}"
        prices[model] = ModelPrice(
            parse_price_value(f"{where}.input", entry["input"]), parse_price_value(f"{where}.output", entry["output"])
        )
    return prices


def apply_env_overrides(prices: Mapping[str, ModelPrice], env: Mapping[str, str]) -> dict[str, ModelPrice]:
    """PRICE_<MODEL>_INPUT / PRICE_<MODEL>_OUTPUT override one side of a known model's price."""
    result = dict(prices)
    for model, price in prices.items():
        sides: dict[str, int] = {"INPUT": price.input_per_1k, "OUTPUT": price.output_per_1k}
        for side in sides:
            found: dict[str, int] = {}
            for stem in env_names(model):
                var = f"PRICE_{stem}_{side}"
                if var in env and env[var].strip():
                    found[var] = parse_price_value(var, env[var])
            if len(set(found.values())) > 1:
                raise PricingError(f"{' and '.join(found)}: both set with different values for {model}")
            if found:
                sides[side] = next(iter(found.values()))
        result[model] = ModelPrice(sides["INPUT"], sides["OUTPUT"])
    return result


USD_BASE_UNITS = 10**6  # 1 USD is taken as 1 USDC: 10^6 base units
MAX_COST = 2**63 - 1  # what a ledger column holds


def pass_through_cost(cost_usd: Decimal, markup: Fraction) -> int:
    """An upstream's reported cost in USD times the markup, in base units, rounded up; exact
    (a Decimal made from the JSON number's text, a Fraction), never more than MAX_COST."""
    return min(math.ceil(Fraction(cost_usd) * USD_BASE_UNITS * markup), MAX_COST)


@dataclass(frozen=True)
class ReservationPlan:
    """What one request may cost, decided before it goes upstream.

    `fit` runs inside the ledger's transaction, where the channel's headroom is known; it is
    pure so that the money rules it encodes are tested without a database. `fixed` is a
    per-request price (images): the whole of it is reserved, and charged on success. `markup`
    is the pass-through rule: the upstream's reported cost times it, within the reservation,
    which the token prices set.
    """

    price: ModelPrice
    input_tokens: int
    wanted_output_tokens: int
    min_output_tokens: int
    fixed: int | None = None
    markup: Fraction | None = None

    @property
    def worst_case(self) -> int:
        if self.fixed is not None:
            return self.fixed
        return cost(self.price, self.input_tokens, self.wanted_output_tokens)

    @property
    def minimum(self) -> int:
        if self.fixed is not None:
            return self.fixed
        return cost(self.price, self.input_tokens, min(self.min_output_tokens, self.wanted_output_tokens))

    @property
    def least_request(self) -> int:
        """What the smallest request like this one costs: no input and the minimum output, or
        the per-request price (X-DRAIN-Next-Min)."""
        return self.fixed if self.fixed is not None else cost(self.price, 0, self.min_output_tokens)

    def fit(self, headroom: int) -> tuple[int, int] | None:
        """(amount to reserve, output tokens to allow) within `headroom`, or None when the
        headroom does not pay for the input plus the minimum output."""
        if self.fixed is not None:
            return (self.fixed, 0) if headroom >= self.fixed else None
        if headroom >= self.worst_case:
            return self.worst_case, self.wanted_output_tokens
        if headroom < self.minimum:
            return None
        affordable = affordable_output_tokens(self.price, headroom, self.input_tokens)
        tokens = self.wanted_output_tokens if affordable is None else min(affordable, self.wanted_output_tokens)
        return cost(self.price, self.input_tokens, tokens), tokens
