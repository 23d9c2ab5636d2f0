"""Token and dollar accounting, and the dollar cap.

A :class:`CostLedger` prices each API call from the config's price table (dollars per million
input/output tokens) and aggregates calls, cache hits, tokens and dollars per stage and per
principle (read from the request's ``tag``). A stage writes :meth:`CostLedger.to_dict` into its
``stage.json``. ``results_ok``/``results_failed`` count results per judge.

The cap works by reservation: before a request is sent, its estimated cost (input tokens at
chars/4 plus the full ``max_tokens`` of output) is reserved; the request is sent only if spent +
reserved + this estimate stays within ``max_dollars`` (so the cap holds unless chars/4
underestimates the input, e.g. for text that tokenizes densely). After the answer the reservation is
replaced by the actual cost. Once one request is refused the ledger is *exhausted* and refuses
every later one, so a run stops cleanly at the cap instead of trickling on with small requests.

An API judge with a cache attaches the ledger to its store (:meth:`CostLedger.attach`): the cap
then also holds for everything the judge (``backend:model@endpoint``) has been paid through that
store -- by every process of a sweep and every earlier run, killed or not -- through the
cache's ``spend`` table (:meth:`cai.judges.cache.JudgeCache.reserve`). ``judge.max_dollars`` is
then a per-store budget: three reruns, or three parallel jobs, spend it once.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from cai.config import PriceConfig


def estimate_tokens(messages: list[dict]) -> int:
    """Rough input token count before sending: 4 characters per token plus a little per message."""
    chars = sum(len(m.get("content", "")) for m in messages)
    return chars // 4 + 4 * len(messages) + 1


@dataclass
class CostTotals:
    """One row of the ledger."""

    api_calls: int = 0
    cache_hits: int = 0
    adopted_usd: float = 0.0  # paid by a process that died before reporting it (part of cost_usd)
    tokens_in: int = 0
    tokens_out: int = 0
    cached_tokens_in: int = 0
    cached_tokens_out: int = 0
    cost_usd: float = 0.0
    results_ok: int = 0
    results_failed: int = 0

    def add_call(self, tokens_in: int, tokens_out: int, cost_usd: float) -> None:
        self.api_calls += 1
        self.tokens_in += tokens_in
        self.tokens_out += tokens_out
        self.cost_usd += cost_usd

    def add_cache_hit(self, tokens_in: int, tokens_out: int, adopted_usd: float = 0.0) -> None:
        self.cache_hits += 1
        self.cached_tokens_in += tokens_in
        self.cached_tokens_out += tokens_out
        self.adopted_usd += adopted_usd
        self.cost_usd += adopted_usd


class CostLedger:
    """Prices calls, aggregates them per stage and principle, and enforces ``max_dollars``."""

    def __init__(self, prices: Mapping[str, PriceConfig] | None = None, max_dollars: float | None = None) -> None:
        self.prices = dict(prices or {})
        self.max_dollars = max_dollars
        self.total = CostTotals()
        self.by_stage: dict[str, CostTotals] = defaultdict(CostTotals)
        self.by_principle: dict[str, CostTotals] = defaultdict(CostTotals)
        self.reserved_usd = 0.0
        self.exhausted = False
        self._lock = threading.Lock()
        self._store: Any = None  # (JudgeCache, scope) once attached

    # ---- prices -------------------------------------------------------------------------
    def add_prices(self, prices: Mapping[str, PriceConfig]) -> None:
        """Merge a judge's price table into the ledger (prices already known stay)."""
        with self._lock:
            for model, price in prices.items():
                self.prices.setdefault(model, price)

    def cost(self, model: str, tokens_in: int, tokens_out: int) -> float:
        price = self.prices.get(model)
        if price is None:
            return 0.0
        return (tokens_in * price.input_per_mtok + tokens_out * price.output_per_mtok) / 1e6

    # ---- the cap ------------------------------------------------------------------------
    @property
    def spent_usd(self) -> float:
        return self.total.cost_usd

    def attach(self, cache: Any, scope: str) -> None:
        """Hold the cap against the store's ledger too (``cache``: a JudgeCache; ``scope``: the
        judge, ``backend:model@endpoint``). The first judge attached wins."""
        with self._lock:
            if self._store is None:
                self._store = (cache, scope)

    def store_spent(self) -> float | None:
        """What the attached store says the judge has been paid (None when not attached)."""
        return self._store[0].spent(self._store[1]) if self._store is not None else None

    def try_reserve(self, estimate_usd: float) -> bool | str:
        """Reserve ``estimate_usd`` for a request about to be sent; False: do not send it.

        A truthy result is the reservation: give it back with :meth:`release`."""
        with self._lock:
            if self.max_dollars is None:
                return True
            spent = self.total.cost_usd
            over = spent + self.reserved_usd + estimate_usd > self.max_dollars
            if self.exhausted or spent >= self.max_dollars or over:
                self.exhausted = True
                return False
            token: bool | str = True
            if self._store is not None:
                cache, scope = self._store
                token = cache.reserve(scope, estimate_usd, self.max_dollars) or False
                if not token:
                    self.exhausted = True
                    return False
            self.reserved_usd += estimate_usd
            return token

    def release(self, estimate_usd: float, token: bool | str = True) -> None:
        """Give back a reservation (the request finished, was answered or failed)."""
        with self._lock:
            if self.max_dollars is not None:
                self.reserved_usd = max(0.0, self.reserved_usd - estimate_usd)
            store = self._store
        if isinstance(token, str) and store is not None:
            store[0].unreserve(token)

    # ---- accounting ---------------------------------------------------------------------
    def _rows(self, tag: Mapping) -> list[CostTotals]:
        stage = str(tag.get("stage", "-"))
        principle = str(tag.get("principle_id", "-"))
        return [self.total, self.by_stage[stage], self.by_principle[principle]]

    def record_call(self, tag: Mapping, tokens_in: int, tokens_out: int, cost_usd: float) -> None:
        with self._lock:
            for row in self._rows(tag):
                row.add_call(tokens_in, tokens_out, cost_usd)

    def record_cache_hit(self, tag: Mapping, tokens_in: int, tokens_out: int, adopted_usd: float = 0.0) -> None:
        """A cached answer (free, unless ``adopted_usd``: paid by a process that died first)."""
        with self._lock:
            for row in self._rows(tag):
                row.add_cache_hit(tokens_in, tokens_out, adopted_usd)

    def record_result(self, tag: Mapping, ok: bool) -> None:
        with self._lock:
            for row in self._rows(tag):
                if ok:
                    row.results_ok += 1
                else:
                    row.results_failed += 1

    def to_dict(self) -> dict:
        """JSON-ready summary for ``stage.json``."""
        with self._lock:
            return {
                "total": asdict(self.total),
                "by_stage": {k: asdict(v) for k, v in sorted(self.by_stage.items())},
                "by_principle": {k: asdict(v) for k, v in sorted(self.by_principle.items())},
                "max_dollars": self.max_dollars,
                "budget_exhausted": self.exhausted,
            }
