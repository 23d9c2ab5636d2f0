"""Client-side rate limits: token buckets for requests per minute and tokens per minute.

Each bucket refills continuously at ``per_minute / 60`` per second and holds ``burst_s`` seconds
of refill (at least one request's worth), which bounds the largest burst. A request takes one
unit from the request bucket and its *estimated* tokens (chars/4 plus ``max_tokens``) from the
token bucket before it is sent; when the answer reports the actual usage, the difference is
given back or charged (:meth:`RateLimiter.correct`). A request larger than the token bucket
waits for a full bucket and then leaves it in debt, so the long-run rate still holds.

When a server answers 429 with ``retry-after``, :meth:`RateLimiter.defer` holds *every* request
back until then, not only the one that was refused: the server told us the whole key is over.

Waiters are served in arrival order (one asyncio lock), so no request starves.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class TokenBucket:
    """A continuously refilled bucket of ``per_minute`` units per minute."""

    def __init__(self, per_minute: float, burst_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if per_minute <= 0 or burst_s <= 0:
            raise ValueError("per_minute and burst_s must be > 0")
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * burst_s)
        self.level = self.capacity
        self._clock = clock
        self._updated = clock()

    def _refill(self) -> None:
        now = self._clock()
        self.level = min(self.capacity, self.level + (now - self._updated) * self.rate)
        self._updated = now

    def wait_s(self, amount: float) -> float:
        """Seconds until ``amount`` (at most a full bucket) is available; 0 if it is now."""
        self._refill()
        need = min(amount, self.capacity)
        return 0.0 if self.level >= need else (need - self.level) / self.rate

    def take(self, amount: float) -> None:
        self._refill()
        self.level -= amount

    def give_back(self, amount: float) -> None:
        """Return ``amount`` (negative: charge more), never above capacity."""
        self._refill()
        self.level = min(self.capacity, self.level + amount)


class RateLimiter:
    """Requests-per-minute and tokens-per-minute limits shared by all of a judge's requests."""

    def __init__(
        self,
        rpm: float | None,
        tpm: float | None,
        burst_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.requests = TokenBucket(rpm, burst_s, clock) if rpm else None
        self.tokens = TokenBucket(tpm, burst_s, clock) if tpm else None
        self._clock = clock
        self._not_before = 0.0
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None

    def _get_lock(self) -> asyncio.Lock:
        # one lock per event loop: the sync wrappers run each batch on a fresh loop
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock_loop is not loop:
            self._lock, self._lock_loop = asyncio.Lock(), loop
        return self._lock

    def _wait_s(self, tokens: int) -> float:
        wait = self._not_before - self._clock()
        if self.requests is not None:
            wait = max(wait, self.requests.wait_s(1))
        if self.tokens is not None:
            wait = max(wait, self.tokens.wait_s(tokens))
        return wait

    async def acquire(self, tokens: int) -> None:
        """Wait until one request of ``tokens`` estimated tokens may be sent, then take it."""
        async with self._get_lock():
            while (wait := self._wait_s(tokens)) > 0:
                await asyncio.sleep(wait)
            if self.requests is not None:
                self.requests.take(1)
            if self.tokens is not None:
                self.tokens.take(tokens)

    def correct(self, estimated: int, actual: int) -> None:
        """Replace a request's estimated tokens by the usage the server reported."""
        if self.tokens is not None:
            self.tokens.give_back(estimated - actual)

    def defer(self, seconds: float) -> None:
        """Send nothing for ``seconds`` (the server said so with retry-after)."""
        self._not_before = max(self._not_before, self._clock() + seconds)
