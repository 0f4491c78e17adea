"""Pins `drain_provider.pricing`: the integer money arithmetic and how prices are configured.

- `cost` is the reference provider's formula (floor division per part, 500 in / 200 out on gpt-4o = 8250).
- `affordable_output_tokens` returns the exact maximum a budget pays for (checked over many
  random cases), and `ReservationPlan.fit` never reserves above the headroom.
- `PRICE_<MODEL>_<SIDE>` overrides accept both the canonical and the reference provider's compact spelling,
  and every bad value or pricing file is a `PricingError` naming where it came from.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from drain_provider.pricing import (
    DEFAULT_PRICES,
    ModelPrice,
    PricingError,
    ReservationPlan,
    affordable_output_tokens,
    apply_env_overrides,
    cost,
    env_names,
    load_pricing_file,
)

GPT4O = ModelPrice(7500, 22500)
RNG_SEED = 1234


def random_price(rng: random.Random) -> ModelPrice:
    return ModelPrice(rng.choice([0, 1, 7, 999, 1000, 7500, rng.randrange(10**6)]), rng.randrange(1, 10**6))


# --- cost ------------------------------------------------------------------------------------


def test_cost_reference_example() -> None:
    assert cost(GPT4O, 500, 200) == 3750 + 4500 == 8250


def test_cost_floors_each_part_separately() -> None:
    assert cost(ModelPrice(999, 999), 1, 1) == 0
    assert cost(ModelPrice(999, 999), 2, 0) == 1
    assert cost(ModelPrice(1500, 1500), 1, 1) == 2  # 1 + 1, not (1.5 + 1.5)


def test_cost_is_zero_for_nothing() -> None:
    assert cost(GPT4O, 0, 0) == 0


def test_default_prices_include_the_reference_gpt4o() -> None:
    assert DEFAULT_PRICES["gpt-4o"] == GPT4O


# --- affordable_output_tokens ----------------------------------------------------------------


def test_affordable_output_tokens_is_exact_maximum() -> None:
    rng = random.Random(RNG_SEED)
    for _ in range(3000):
        price, input_tokens = random_price(rng), rng.randrange(5000)
        budget = cost(price, input_tokens, 0) + rng.randrange(10**5)
        n = affordable_output_tokens(price, budget, input_tokens)
        assert n is not None and n >= 0
        assert cost(price, input_tokens, n) <= budget
        assert cost(price, input_tokens, n + 1) > budget


def test_affordable_output_tokens_when_budget_misses_input() -> None:
    assert affordable_output_tokens(GPT4O, 3749, 500) == -1
    assert affordable_output_tokens(GPT4O, 3750, 500) == 0  # input covered, 1 output token costs 22


def test_affordable_output_tokens_free_output_is_unlimited() -> None:
    assert affordable_output_tokens(ModelPrice(7500, 0), 10**6, 500) is None


def test_affordable_output_tokens_free_output_still_needs_input_paid() -> None:
    assert affordable_output_tokens(ModelPrice(7500, 0), 0, 500) == -1


# --- ReservationPlan.fit ---------------------------------------------------------------------


def plan(wanted: int = 200, minimum: int = 16, input_tokens: int = 500) -> ReservationPlan:
    return ReservationPlan(GPT4O, input_tokens, wanted, minimum)


def test_fit_full_worst_case_when_headroom_allows() -> None:
    assert plan().fit(8250) == (8250, 200)
    assert plan().fit(10**9) == (8250, 200)


def test_fit_caps_tokens_when_headroom_is_short() -> None:
    result = plan().fit(8000)
    assert result is not None
    reserved, tokens = result
    assert tokens == affordable_output_tokens(GPT4O, 8000, 500) == 188
    assert reserved == cost(GPT4O, 500, tokens) == 7980 <= 8000


def test_fit_none_below_minimum() -> None:
    minimum = cost(GPT4O, 500, 16)
    assert plan().fit(minimum - 1) is None
    assert plan().fit(minimum) == (minimum, 16)


def test_fit_min_output_larger_than_wanted() -> None:
    small = plan(wanted=10, minimum=16)
    assert small.minimum == small.worst_case == cost(GPT4O, 500, 10)
    assert small.fit(small.worst_case) == (small.worst_case, 10)
    assert small.fit(small.worst_case - 1) is None


def test_fit_invariants_over_random_plans() -> None:
    rng = random.Random(RNG_SEED)
    for _ in range(3000):
        p = ReservationPlan(random_price(rng), rng.randrange(5000), rng.randrange(1, 5000), rng.randrange(1, 64))
        headroom = rng.randrange(p.worst_case + 2)
        result = p.fit(headroom)
        if headroom < p.minimum:
            assert result is None
            continue
        assert result is not None
        reserved, tokens = result
        assert reserved == cost(p.price, p.input_tokens, tokens) <= headroom
        assert min(p.min_output_tokens, p.wanted_output_tokens) <= tokens <= p.wanted_output_tokens
        assert tokens == p.wanted_output_tokens or cost(p.price, p.input_tokens, tokens + 1) > headroom


# --- environment overrides -------------------------------------------------------------------


def test_env_names() -> None:
    assert env_names("gpt-4o") == ("GPT_4O", "GPT4O")
    assert env_names("gpt-3.5-turbo") == ("GPT_3_5_TURBO", "GPT35TURBO")
    assert env_names("demo") == ("DEMO",)


@pytest.mark.parametrize("var", ["PRICE_GPT_4O_INPUT", "PRICE_GPT4O_INPUT"])
def test_override_input_either_spelling(var: str) -> None:
    prices = apply_env_overrides(DEFAULT_PRICES, {var: "100"})
    assert prices["gpt-4o"] == ModelPrice(100, 22500)
    assert prices["gpt-4o-mini"] == DEFAULT_PRICES["gpt-4o-mini"]


def test_override_output_and_whitespace() -> None:
    prices = apply_env_overrides(DEFAULT_PRICES, {"PRICE_GPT_4O_OUTPUT": " 30000 "})
    assert prices["gpt-4o"] == ModelPrice(7500, 30000)


def test_override_both_spellings_same_value_is_fine() -> None:
    prices = apply_env_overrides(DEFAULT_PRICES, {"PRICE_GPT_4O_INPUT": "5", "PRICE_GPT4O_INPUT": "5"})
    assert prices["gpt-4o"].input_per_1k == 5


def test_override_both_spellings_different_values_names_both() -> None:
    with pytest.raises(PricingError) as info:
        apply_env_overrides(DEFAULT_PRICES, {"PRICE_GPT_4O_INPUT": "5", "PRICE_GPT4O_INPUT": "6"})
    assert "PRICE_GPT_4O_INPUT" in str(info.value)
    assert "PRICE_GPT4O_INPUT" in str(info.value)


@pytest.mark.parametrize("value", ["1.5", "-3", "abc", "0x10", "١٢٣", "1e3", "9" * 20])
def test_override_bad_value_names_variable(value: str) -> None:
    with pytest.raises(PricingError, match="PRICE_GPT_4O_INPUT"):
        apply_env_overrides(DEFAULT_PRICES, {"PRICE_GPT_4O_INPUT": value})


def test_override_huge_digit_string_is_a_pricing_error() -> None:
    """More digits than int() converts by default (4300) must still be a PricingError."""
    with pytest.raises(PricingError, match="PRICE_GPT_4O_INPUT"):
        apply_env_overrides(DEFAULT_PRICES, {"PRICE_GPT_4O_INPUT": "9" * 5000})


@pytest.mark.parametrize("value", ["", "   "])
def test_override_empty_value_means_unset(value: str) -> None:
    assert apply_env_overrides(DEFAULT_PRICES, {"PRICE_GPT_4O_INPUT": value}) == DEFAULT_PRICES


def test_override_empty_spelling_does_not_conflict_with_set_one() -> None:
    prices = apply_env_overrides(DEFAULT_PRICES, {"PRICE_GPT_4O_INPUT": "", "PRICE_GPT4O_INPUT": "42"})
    assert prices["gpt-4o"].input_per_1k == 42


def test_override_zero_is_allowed() -> None:
    assert apply_env_overrides(DEFAULT_PRICES, {"PRICE_GPT_4O_OUTPUT": "0"})["gpt-4o"].output_per_1k == 0


def test_override_does_not_mutate_input() -> None:
    original = dict(DEFAULT_PRICES)
    apply_env_overrides(original, {"PRICE_GPT_4O_INPUT": "1"})
    assert original == DEFAULT_PRICES


# --- pricing file ----------------------------------------------------------------------------


def write(tmp_path: Path, content: str) -> Path:
    path = tmp_path / "prices.json"
    path.write_text(content)
    return path


def test_pricing_file_adds_models(tmp_path: Path) -> None:
    path = write(tmp_path, json.dumps({"llama-3": {"input": 100, "output": 300}, "gpt-4o": {"input": 1, "output": 2}}))
    assert load_pricing_file(path) == {"llama-3": ModelPrice(100, 300), "gpt-4o": ModelPrice(1, 2)}


BAD_FILES = {
    "bad json": "{not json",
    "non-object": json.dumps([{"input": 1, "output": 2}]),
    "missing output": json.dumps({"m": {"input": 1}}),
    "extra key": json.dumps({"m": {"input": 1, "output": 2, "cached": 3}}),
    "entry not object": json.dumps({"m": 5}),
    "negative price": json.dumps({"m": {"input": -1, "output": 2}}),
    "float price": json.dumps({"m": {"input": 7.5, "output": 2}}),
    "bool price": json.dumps({"m": {"input": True, "output": 2}}),
    "null price": json.dumps({"m": {"input": None, "output": 2}}),
    "list price": json.dumps({"m": {"input": [1], "output": 2}}),
    "decimal string price": json.dumps({"m": {"input": "7.5", "output": 2}}),
}


@pytest.mark.parametrize("content", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_pricing_file_errors_start_with_variable(tmp_path: Path, content: str) -> None:
    with pytest.raises(PricingError) as info:
        load_pricing_file(write(tmp_path, content))
    assert str(info.value).startswith("PRICING_FILE")


def test_pricing_file_unreadable(tmp_path: Path) -> None:
    with pytest.raises(PricingError) as info:
        load_pricing_file(tmp_path / "missing.json")
    assert str(info.value).startswith("PRICING_FILE")


def test_pricing_file_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(PricingError, match=r"^PRICING_FILE"):
        load_pricing_file(tmp_path)
