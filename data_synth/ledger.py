"""What the run has spent and what it has committed to spend, so `--max-cost-usd` is a hard cap.

Every billed response is added (successful or not), and every request holds a reservation of its
worst-case cost while in flight; a new request is only sent if spent + reserved + its own worst case
stays under the cap. A request whose reply never arrived (timeout, dropped connection) may still have
been billed, so its worst case stays counted against the cap as `uncertain_usd`. Costs are in USD.
"""
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Price:
    input_per_token: float
    output_per_token: float

    @classmethod
    def for_model(cls, prices, model, batch=False):
        """The per-token price of `model` from prices.yaml; batch requests get its discount."""
        table = prices["models"]
        if model not in table:
            raise KeyError(f"model {model!r} has no price in prices.yaml (known: {', '.join(table)}); "
                           f"add it so the cost cap can be enforced")
        scale = prices["batch_discount"] if batch else 1.0
        return cls(table[model]["input"] * scale / 1e6, table[model]["output"] * scale / 1e6)

    def cost(self, prompt_tokens, completion_tokens):
        return prompt_tokens * self.input_per_token + completion_tokens * self.output_per_token


@dataclass
class Ledger:
    cap_usd: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    billed_responses: int = 0
    spent_usd: float = 0.0
    reserved_usd: float = 0.0
    uncertain_usd: float = 0.0
    failures: dict = field(default_factory=dict)

    def add(self, usage, cost):
        """Book one billed response."""
        self.prompt_tokens += usage[0]
        self.completion_tokens += usage[1]
        self.billed_responses += 1
        self.spent_usd += cost

    def count_failure(self, reason):
        self.failures[reason] = self.failures.get(reason, 0) + 1

    def try_reserve(self, worst_case_usd):
        """Hold `worst_case_usd` for a request if the cap allows it; False means do not send it."""
        committed = self.spent_usd + self.uncertain_usd + self.reserved_usd
        if self.cap_usd is not None and committed + worst_case_usd > self.cap_usd:
            return False
        self.reserved_usd += worst_case_usd
        return True

    def release(self, worst_case_usd):
        self.reserved_usd = max(0.0, self.reserved_usd - worst_case_usd)

    @property
    def remaining_usd(self):
        return None if self.cap_usd is None else max(0.0, self.cap_usd - self.spent_usd - self.uncertain_usd)
