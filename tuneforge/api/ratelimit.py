"""A request rate limit per project key (the admin key is not limited): a token bucket per key, in
this API process's memory.

`TUNEFORGE_RATE_LIMIT_PER_MINUTE` requests a minute, with bursts of `TUNEFORGE_RATE_LIMIT_BURST`
(default: a minute's worth). The buckets live in each API process, so N API processes allow a key
N times the rate; a deployment that needs one shared limit puts it in its proxy. Past the limit
the answer is OpenAI's: 429, type `requests`, code `rate_limit_exceeded`, with `Retry-After`
(the SDK waits that long and retries by itself).
"""

from __future__ import annotations

import hashlib
import math
import threading
import time

from tuneforge.api.errors import RateLimitExceeded
from tuneforge.config import Settings

#: Buckets kept before idle ones (full again) are dropped.
MAX_BUCKETS = 100_000


class RateLimited(RateLimitExceeded):
    def __init__(self, message: str, retry_after: float, limit: float) -> None:
        super().__init__(message)
        self.headers = {
            "retry-after": str(max(1, math.ceil(retry_after))),
            "retry-after-ms": str(max(1, math.ceil(retry_after * 1000))),
            "x-ratelimit-limit-requests": f"{limit:g}",
            "x-ratelimit-remaining-requests": "0",
            "x-should-retry": "true",
        }


class RateLimiter:
    """Token buckets by key: `capacity` tokens, refilled at `per_minute / 60` a second."""

    def __init__(self, per_minute: float, burst: int = 0) -> None:
        self.per_minute = per_minute
        self.rate = per_minute / 60.0
        self.capacity = float(burst or max(1, math.ceil(per_minute)))
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    @classmethod
    def from_settings(cls, settings: Settings) -> RateLimiter | None:
        if not settings.rate_limit_per_minute:
            return None
        return cls(settings.rate_limit_per_minute, settings.rate_limit_burst)

    def wait_seconds(self, key: str, now: float | None = None) -> float:
        """Takes a token for `key`: 0 when there was one, else the seconds until there is."""
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, at = self._buckets.get(key, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - at) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                if len(self._buckets) > MAX_BUCKETS:
                    self._drop_idle(now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate

    def _drop_idle(self, now: float) -> None:
        full_after = self.capacity / self.rate
        self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < full_after}

    def check(self, api_key: str) -> None:
        """Raises `RateLimited` when `api_key` is over its rate."""
        key = hashlib.blake2b(api_key.encode(), digest_size=16).hexdigest()
        wait = self.wait_seconds(key)
        if wait > 0:
            raise RateLimited(
                f"Rate limit reached for this API key on requests per min (RPM): Limit "
                f"{self.per_minute:g}. Please try again in {wait:.1f}s.",
                retry_after=wait,
                limit=self.per_minute,
            )
