"""The stream's token meter counts lazily but never lets a stream pass its limit, and its total
is the count of everything delivered."""

from __future__ import annotations

import random

import pytest

from drain_provider.tokens import TokenCounter, TokenMeter

FRAGMENTS = [" word", "Hello", ",", " 世界", "🙂", " ünïcödé", "\n", "<|endoftext|>", "", " a" * 7, "中文字符"]


class CountingEncoding:
    """The real encoding, with its calls counted."""

    def __init__(self) -> None:
        self.inner = TokenCounter().encoding("gpt-4o")
        self.calls = 0
        self.name = self.inner.name

    def encode(self, text: str, disallowed_special: tuple[str, ...] = ()) -> list[int]:
        self.calls += 1
        return self.inner.encode(text, disallowed_special=disallowed_special)


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
