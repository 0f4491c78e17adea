"""The failure limiter, pure, with a fake clock:

- a key may fail `per_minute` times at once, then once per 60/`per_minute` s; `retry_after` says
  how long to wait, in whole seconds, never 0;
- failures of requests that were in flight together all count (the bucket goes into debt), so
  concurrency does not buy more failures per minute;
- memory is bounded: refilled keys are dropped first, then the least recently touched.
"""

from __future__ import annotations

from drain_provider.ratelimit import FailureLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_of_per_minute_failures_then_one_per_interval() -> None:
    clock = Clock()
    limiter = FailureLimiter(6, clock=clock)  # one every 10 s
    for _ in range(6):
        assert limiter.retry_after("a") is None
        limiter.fail("a")
    assert limiter.retry_after("a") == 10
    clock.now += 9.5
    assert limiter.retry_after("a") == 1  # rounded up: never "retry in 0 s"
    clock.now += 0.5
    assert limiter.retry_after("a") is None
    limiter.fail("a")
    assert limiter.retry_after("a") == 10


def test_keys_are_apart() -> None:
    limiter = FailureLimiter(1, clock=Clock())
    limiter.fail("a")
    assert limiter.retry_after("a") == 60
    assert limiter.retry_after("b") is None


def test_concurrent_failures_are_a_debt() -> None:
    """Twelve requests were let in together and all failed: the key waits until the minute
    has paid back the six beyond its burst."""
    clock = Clock()
    limiter = FailureLimiter(6, clock=clock)
    for _ in range(12):
        limiter.fail("a")
    assert limiter.retry_after("a") == 70  # 7 failures of 10 s each to get back to one token
    clock.now += 69
    assert limiter.retry_after("a") == 1
    clock.now += 1
    assert limiter.retry_after("a") is None


def test_the_bucket_refills_to_the_burst_only() -> None:
    clock = Clock()
    limiter = FailureLimiter(3, clock=clock)
    limiter.fail("a")
    clock.now += 3600
    for _ in range(3):
        limiter.fail("a")
    assert limiter.retry_after("a") == 20


def test_zero_is_off() -> None:
    limiter = FailureLimiter(0, clock=Clock())
    for _ in range(1000):
        limiter.fail("a")
    assert not limiter.enabled
    assert limiter.retry_after("a") is None
    assert len(limiter) == 0


def test_memory_is_bounded_and_refilled_keys_go_first() -> None:
    clock = Clock()
    limiter = FailureLimiter(60, max_keys=100, clock=clock)
    limiter.fail("old")
    clock.now += 61  # "old" is full again: as good as never seen
    for i in range(100):
        limiter.fail(f"10.0.0.{i}")
    assert len(limiter) <= 100
    # An attacker with a thousand addresses makes the limiter forget, never grow.
    for i in range(1000):
        for _ in range(60):
            limiter.fail(f"attacker-{i}")
        assert len(limiter) <= 100
    assert limiter.retry_after("attacker-999") is not None  # the latest are still limited


def test_eviction_sweeps_once_per_tenth() -> None:
    """A full table is swept down to nine tenths, so a flood of new keys costs O(1) each on
    average, not a sweep of the whole table per key."""
    limiter = FailureLimiter(1, max_keys=1000, clock=Clock())
    for i in range(1001):
        limiter.fail(str(i))
    assert len(limiter) == 900
    for i in range(1001, 1100):
        limiter.fail(str(i))
    assert len(limiter) == 999
