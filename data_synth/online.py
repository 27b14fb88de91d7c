"""Online mode: many concurrent chat-completions requests under a retry scheduler and a hard cost cap.

Each worker takes a sample and keeps trying it until it yields a record, is parked after
`max_attempts` strikes, or the run stops. Every outcome is journaled the moment it arrives, before the
next step, so a kill never loses a paid-for reply and a rerun never asks for a finished sample again.
"""
import asyncio
import random
from collections import deque

from tqdm import tqdm

from data_synth.client import UNCERTAIN, make_client, send
from data_synth.limiter import RateLimiter


class OnlineRun:
    def __init__(self, synthesis, todo, state, journal):
        self.syn = synthesis
        self.s = synthesis.s
        self.state = state
        self.ledger = state.ledger
        self.journal = journal
        self.queue = deque(todo)
        self.stopped = None
        self.in_flight = 0
        self.budget = asyncio.Condition()
        self.client = make_client(self.s.base_url, self.s.api_key_env, self.s.request_timeout_s, self.s.concurrency)
        self.limiter = RateLimiter(self.s.requests_per_minute, self.s.tokens_per_minute)
        self.progress = tqdm(total=len(todo), desc="synth", unit="sample", disable=not self.s.progress,
                             dynamic_ncols=True)

    async def _reserve(self, worst_case):
        """Hold budget for one request; None once the cap cannot cover it even after in-flight ones finish."""
        async with self.budget:
            while True:
                if self.stopped:
                    return False
                if self.ledger.try_reserve(worst_case):
                    self.in_flight += 1
                    return True
                if self.in_flight == 0:
                    self.stopped = "budget"
                    self.budget.notify_all()
                    return False
                await self.budget.wait()

    async def _settle(self, worst_case):
        async with self.budget:
            self.ledger.release(worst_case)
            self.in_flight -= 1
            self.budget.notify_all()

    def _journal(self, spec, outcome, worst_case):
        cost = self.syn.price.cost(*outcome.usage) if outcome.usage else 0.0
        event = {"e": "attempt", "id": spec.id, "ok": outcome.record is not None, "reason": outcome.reason,
                 "detail": outcome.detail[:300],
                 "strike": outcome.strike, "usage": list(outcome.usage) if outcome.usage else None, "cost": cost,
                 "batch": None}
        if outcome.reason in UNCERTAIN:
            event["uncertain"] = worst_case
        if outcome.record is not None:
            event["record"] = outcome.record
        self.state.apply(event, self.journal.write(event))

    async def _sample(self, spec):
        # Image decoding and encoding run in a thread so they do not stall the other requests.
        body, bound, worst_case = await asyncio.to_thread(self.syn.request, spec)
        script = self.syn.script(spec)
        attempt = len(self.state.reasons.get(spec.id, ()))
        while self.stopped is None:
            if not await self._reserve(worst_case):
                return
            try:
                await self.limiter.acquire(bound + body["max_completion_tokens"])
                outcome = await send(self.client, spec, body, script, attempt)
                self._journal(spec, outcome, worst_case)
            finally:
                await self._settle(worst_case)
            attempt += 1
            if outcome.record is not None:
                self.progress.update()
                self.progress.set_postfix_str(f"${self.ledger.spent_usd:.2f} parked={len(self.state.parked)}",
                                              refresh=False)
                return
            if outcome.fatal:
                self.stopped = f"fatal: {outcome.reason} ({outcome.detail})"
                return
            if outcome.reason == "length":
                body, worst_case = self._longer(body, bound)
            if self.state.strikes[spec.id] >= self.s.max_attempts:
                reasons = self.state.reasons[spec.id]
                event = {"e": "parked", "id": spec.id, "reasons": reasons}
                self.state.apply(event, self.journal.write(event))
                return
            await self.syn.sleep(self._delay(outcome, attempt))

    def _longer(self, body, bound):
        """A reply cut off at the token limit would be cut again: allow twice as many, up to 4x the setting."""
        limit = min(2 * body["max_completion_tokens"], 4 * self.s.max_completion_tokens)
        return {**body, "max_completion_tokens": limit}, self.syn.price.cost(bound, limit)

    def _delay(self, outcome, attempt):
        """The server's Retry-After when given (however long), else exponential backoff with jitter."""
        if outcome.retry_after is not None:
            return outcome.retry_after
        base = self.s.backoff_base_s * 2 ** min(attempt - 1, 6)
        return min(base, 60.0) * (0.5 + random.random() / 2)

    async def _worker(self):
        while self.queue and self.stopped is None:
            await self._sample(self.queue.popleft())

    async def run(self):
        try:
            await asyncio.gather(*(self._worker() for _ in range(self.s.concurrency)))
        finally:
            self.progress.close()
            await self.client.close()
        return self.stopped


async def run_online(synthesis, todo, state, journal):
    return await OnlineRun(synthesis, todo, state, journal).run()
