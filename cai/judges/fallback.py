"""A judge with a second judge behind it for the requests the first one failed.

The primary answers the whole batch; every request it failed for a reason other than the
budget (a refusal, an unparseable answer, an error that outlasted the retries) goes to the
fallback. A result the fallback produced says so: ``backend`` is the fallback's name and
``fallback_from`` keeps the primary's failure reason; attempts, tokens, cost and latency add
up over both. Both judges share one :class:`~cai.judges.cost.CostLedger`, so the
dollar cap covers them together; once it is reached the fallback is not tried.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from cai.judges.types import (
    BUDGET,
    BudgetExhausted,
    ChoiceRequest,
    ChoiceResult,
    GenerateRequest,
    GenerateResult,
    JudgeBackend,
    SyncJudgeMixin,
)


def merge(first: Any, second: Any) -> Any:
    """``second`` (the fallback's result) carrying what ``first`` (the primary's) cost."""
    return dataclasses.replace(
        second,
        attempts=first.attempts + second.attempts,
        tokens_in=first.tokens_in + second.tokens_in,
        tokens_out=first.tokens_out + second.tokens_out,
        cost_usd=first.cost_usd + second.cost_usd,
        latency_s=first.latency_s + second.latency_s,
        cache_hit=first.cache_hit and second.cache_hit,
        fallback_from=first.failure_reason,
    )


class FallbackJudge(SyncJudgeMixin):
    """``primary``, with ``fallback`` answering what ``primary`` failed."""

    def __init__(self, primary: JudgeBackend, fallback: JudgeBackend) -> None:
        self.primary = primary
        self.fallback = fallback
        self.name = primary.name
        self.model = primary.model
        self.ledger = getattr(primary, "ledger", None)

    async def choose_many(self, reqs: list[ChoiceRequest], progress: bool = False) -> list[ChoiceResult]:
        return await self._run("choose_many", reqs, progress)

    async def generate_many(self, reqs: list[GenerateRequest], progress: bool = False) -> list[GenerateResult]:
        return await self._run("generate_many", reqs, progress)

    async def _run(self, method: str, reqs: list, progress: bool) -> list:
        # a BudgetExhausted from the primary propagates: the shared cap stops the fallback too
        results = list(await getattr(self.primary, method)(reqs, progress=progress))
        redo = [i for i, r in enumerate(results) if not r.ok and r.failure_reason != BUDGET]
        if not redo:
            return results
        stopped: BudgetExhausted | None = None
        try:
            second = await getattr(self.fallback, method)([reqs[i] for i in redo], progress=progress)
        except BudgetExhausted as exc:
            second, stopped = exc.results, exc
        for i, r in zip(redo, second):
            results[i] = merge(results[i], r)
        if stopped is not None:
            raise BudgetExhausted(results, stopped.spent_usd, stopped.cap_usd)
        return results

    def close(self) -> None:
        for judge in (self.primary, self.fallback):
            close = getattr(judge, "close", None)
            if close is not None:
                close()
