"""A per-client limit on failures, pure: a token bucket per key, in bounded memory.

Why a bucket of failures and not of requests: a paying client may send as many requests as it
pays for; what costs the server without paying it is the requests that fail payment (no voucher,
a forged or replayed one, a body the endpoint refuses). Each key may fail `per_minute` times in
a burst, then once every 60 / `per_minute` seconds.

A failure is counted when it is known, after the request was served; requests that were already
in flight all count, so the bucket may go below zero, and the key then waits until it has paid
that debt back: concurrency does not buy more failures in the long run.

Memory is bounded by `max_keys`: a key whose bucket has refilled is the same as one never seen
and is dropped; when the table is full of keys still in debt, the one touched longest ago goes.
An attacker with more addresses than that can make the limiter forget some of them, never grow
it.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

MAX_KEYS = 100_000


@dataclass
class _Bucket:
    tokens: float
    at: float  # the clock reading `tokens` is for


class FailureLimiter:
    """`retry_after(key)` before serving, `fail(key)` after a failure. `per_minute` 0: no limit."""

    def __init__(
        self, per_minute: int, *, max_keys: int = MAX_KEYS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0  # tokens per second
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def __len__(self) -> int:
        return len(self._buckets)

    def _tokens(self, bucket: _Bucket, now: float) -> float:
        return min(self.capacity, bucket.tokens + (now - bucket.at) * self.rate)

    def retry_after(self, key: str) -> int | None:
        """None if `key` may be served now; else the whole seconds until it may."""
        bucket = self._buckets.get(key)
        if not self.enabled or bucket is None:
            return None
        tokens = self._tokens(bucket, self._clock())
        if tokens >= 1:
            return None
        return max(1, math.ceil((1 - tokens) / self.rate))

    def fail(self, key: str) -> None:
        """`key` failed once more."""
        if not self.enabled:
            return
        now = self._clock()
        bucket = self._buckets.pop(key, None)
        tokens = self.capacity if bucket is None else self._tokens(bucket, now)
        self._buckets[key] = _Bucket(tokens - 1, now)  # re-inserted: the most recently touched
        if len(self._buckets) > self.max_keys:
            self._shrink(now)

    def _shrink(self, now: float) -> None:
        """Drop the keys whose buckets are full again, then the least recently touched, down to
        nine tenths of `max_keys`: the sweep is O(keys), so it runs once per tenth, not per key."""
        full = [key for key, bucket in self._buckets.items() if self._tokens(bucket, now) >= self.capacity]
        for key in full:
            del self._buckets[key]
        while len(self._buckets) > self.max_keys - self.max_keys // 10:
            self._buckets.popitem(last=False)
