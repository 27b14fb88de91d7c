"""Requests-per-minute and tokens-per-minute pacing, so the run stays under the account's rate limits
instead of discovering them through 429s."""
import asyncio
import time


class TokenBucket:
    """Holds up to `per_minute` units and refills continuously at `per_minute / 60` units per second."""

    def __init__(self, per_minute):
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.level = self.capacity
        self.stamp = time.monotonic()

    def _refill(self):
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_time(self, amount):
        """Seconds until `amount` units are available (amounts above capacity wait for a full bucket)."""
        self._refill()
        amount = min(amount, self.capacity)
        return 0.0 if self.level >= amount else (amount - self.level) / self.rate

    def take(self, amount):
        self.level -= min(amount, self.capacity)


class RateLimiter:
    def __init__(self, requests_per_minute, tokens_per_minute):
        self.requests = TokenBucket(requests_per_minute)
        self.tokens = TokenBucket(tokens_per_minute)
        self._lock = asyncio.Lock()

    async def acquire(self, tokens):
        """Wait until one request of `tokens` (an estimate: prompt bound + max completion) may be sent."""
        async with self._lock:
            while True:
                delay = max(self.requests.wait_time(1), self.tokens.wait_time(tokens))
                if delay <= 0:
                    break
                await asyncio.sleep(delay)
            self.requests.take(1)
            self.tokens.take(tokens)
