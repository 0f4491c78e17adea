"""The stream's token meter counts lazily but never lets a stream pass its limit, and its total
is the count of everything delivered. Counting against a limit (`count_up_to`, `fit_prefix`, the
meter's `fits`) costs what the limit allows, never what a huge text would."""

from __future__ import annotations

import random

import pytest
from helpers import CountingEncoding

from drain_provider.tokens import TokenMeter, count_up_to, fit_prefix, longest_token_bytes

FRAGMENTS = [" word", "Hello", ",", " 世界", "🙂", " ünïcödé", "\n", "<|endoftext|>", "", " a" * 7, "中文字符"]


def exact(encoding: CountingEncoding, texts: list[str]) -> int:
    return len(encoding.inner.encode("".join(texts), disallowed_special=()))


@pytest.mark.parametrize("seed", range(40))
def test_the_limit_is_never_passed_and_only_passed_texts_are_refused(seed: int) -> None:
    rng = random.Random(seed)
    encoding = CountingEncoding()
    limit = rng.randint(0, 60)
    meter = TokenMeter(encoding, limit)  # type: ignore[arg-type]
    delivered: list[str] = []
    for _ in range(200):
        text = rng.choice(FRAGMENTS)
        if not meter.fits(text):
            # Refused only when the exact count would pass the limit.
            assert meter.tokens + len(encoding.inner.encode(text, disallowed_special=())) > limit
            break
        meter.add(text)
        delivered.append(text)
        assert meter.tokens <= limit
    assert meter.tokens <= limit


def test_far_from_the_limit_nothing_is_counted_until_asked() -> None:
    encoding = CountingEncoding()
    meter = TokenMeter(encoding, 4096)  # type: ignore[arg-type]
    texts = ["word"] + [" word"] * 249
    for text in texts:
        assert meter.fits(text)
        meter.add(text)
    assert encoding.calls == 0
    assert meter.tokens == exact(encoding, texts) == 250
    assert encoding.calls == 1


def test_near_the_limit_it_counts_a_fraction_of_the_events() -> None:
    encoding = CountingEncoding()
    meter = TokenMeter(encoding, 260)  # type: ignore[arg-type]
    for text in ["word"] + [" word"] * 249:
        assert meter.fits(text)
        meter.add(text)
    assert meter.tokens == 250
    assert encoding.calls < 60  # counting every event would be 250 calls


def test_the_event_that_would_pass_the_limit_is_refused() -> None:
    encoding = CountingEncoding()
    meter = TokenMeter(encoding, 10)  # type: ignore[arg-type]
    for _ in range(10):
        assert meter.fits(" word")
        meter.add(" word")
    assert not meter.fits(" word")
    assert meter.fits("")  # nothing more to deliver still fits
    assert meter.tokens == 10


def test_no_limit_when_output_is_free() -> None:
    meter = TokenMeter(CountingEncoding(), None)  # type: ignore[arg-type]
    assert meter.fits(" word" * 10_000)
    meter.add(" word" * 3)
    assert meter.tokens == 3


def n(encoding: CountingEncoding, text: str) -> int:
    return len(encoding.inner.encode(text, disallowed_special=()))


def test_the_longest_token_bounds_the_bytes_of_any_tokens() -> None:
    encoding = CountingEncoding()
    longest = longest_token_bytes(encoding)  # type: ignore[arg-type]
    assert longest == 128  # cl100k_base: a run of spaces
    for text in (" " * 1000, "=" * 1000, "-" * 1000, "".join(FRAGMENTS) * 20):
        tokens = encoding.inner.encode(text, disallowed_special=())
        assert max(len(encoding.inner.decode_single_token_bytes(token)) for token in tokens) <= longest


@pytest.mark.parametrize("text", ["", "Hello, world!", " word" * 50, "中文字符🙂" * 9, "<|endoftext|> x"])
def test_count_up_to_is_the_count_when_it_fits(text: str) -> None:
    encoding = CountingEncoding()
    exact_count = n(encoding, text)
    for limit in (0, exact_count - 1, exact_count, exact_count + 5):
        expected = exact_count if 0 <= exact_count <= limit else None
        assert count_up_to(encoding, text, limit) == expected  # type: ignore[arg-type]


def test_a_huge_text_is_refused_without_being_encoded() -> None:
    encoding = CountingEncoding()
    assert count_up_to(encoding, "word " * 2_000_000, 100) is None  # type: ignore[arg-type]
    assert encoding.calls == 0
    meter = TokenMeter(encoding, 100)  # type: ignore[arg-type]
    assert not meter.fits("word " * 2_000_000)
    assert encoding.calls == 0


@pytest.mark.parametrize("seed", range(30))
def test_fit_prefix_cuts_the_text_at_the_budget(seed: int) -> None:
    rng = random.Random(seed)
    encoding = CountingEncoding()
    text = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 80)))
    budget = rng.randint(0, 90)
    prefix, count = fit_prefix(encoding, text, budget)  # type: ignore[arg-type]
    assert text.startswith(prefix)
    assert count == n(encoding, prefix) <= budget
    if n(encoding, text) <= budget:
        assert prefix == text
    else:
        # At the budget, less at most the tokens of one character cut in two (dropped whole).
        assert count >= budget - 3


def test_fit_prefix_encodes_a_head_bounded_by_the_budget() -> None:
    encoding = CountingEncoding()
    text = "Lorem ipsum dolor sit amet, 世界. " * 300_000  # about 10 MB
    prefix, count = fit_prefix(encoding, text, 50)  # type: ignore[arg-type]
    assert count == 50 and text.startswith(prefix) and len(prefix) > 100
    assert encoding.encoded_bytes <= 3 * 51 * longest_token_bytes(encoding)  # type: ignore[arg-type]


def test_fit_prefix_never_ends_in_half_a_character() -> None:
    encoding = CountingEncoding()
    text = "🙂" * 40  # each emoji is several tokens
    for budget in range(1, 30):
        prefix, count = fit_prefix(encoding, text, budget)  # type: ignore[arg-type]
        assert set(prefix) <= {"🙂"} and count == n(encoding, prefix) <= budget


def test_take_counts_a_text_once() -> None:
    encoding = CountingEncoding()
    meter = TokenMeter(encoding, 10)  # type: ignore[arg-type]
    assert meter.take(" word" * 8)  # 40 bytes: counted to decide, and that count is kept
    assert meter.tokens == 8 and encoding.calls == 1
    assert not meter.take(" word" * 3)
    assert meter.take(" a")  # 2 bytes: fits by the bound, counted when the total is asked
    assert meter.tokens == 9 and encoding.calls == 3
    free = TokenMeter(encoding, None)  # type: ignore[arg-type]
    assert free.take(" word" * 1000) and free.tokens == 1000
