"""The values a report shows: a metric of an arm (one run's value with its stage's interval, or the
mean over seeds with a Student-t interval), formatted; and what a stage cost (from its stage.json)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cai.report.render import Bar
from cai.stats import seed_summary

if TYPE_CHECKING:
    from cai.report.runs import Arm

CI_SUFFIXES = ("_ci_low", "_ci_high")


def fmt(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if float(v).is_integer() and abs(v) < 1e12:
        return str(int(v))
    return f"{v:.4g}"


@dataclass(frozen=True)
class Cell:
    """An arm's value of one metric: a run's value with its stage's interval, or a seed mean."""

    value: float
    low: float = math.nan
    high: float = math.nan
    seeds: int = 1

    def text(self) -> str:
        s = fmt(self.value)
        if math.isfinite(self.low) and math.isfinite(self.high) and self.low != self.high:
            s += f" [{fmt(self.low)}, {fmt(self.high)}]"
        return s + (f" ({self.seeds} seeds)" if self.seeds > 1 else "")

    def bar(self) -> Bar:
        return Bar(self.value, self.low, self.high)


def arm_cell(arm: Arm, key: str) -> Cell | None:
    values = [r.metrics[key] for r in arm.runs if key in r.metrics and math.isfinite(r.metrics[key])]
    if not values:
        return None
    if len(values) == 1:
        run = next(r for r in arm.runs if key in r.metrics and math.isfinite(r.metrics[key]))
        low, high = (run.metrics.get(key + s, math.nan) for s in CI_SUFFIXES)
        return Cell(values[0], low, high)
    s = seed_summary(values)
    return Cell(s.mean, s.ci_low, s.ci_high, s.n)


def stage_cost(stage: dict[str, Any]) -> tuple[float, float, float, float]:
    c = stage.get("cost") or {}
    vals = [c.get("tokens_in", 0), c.get("tokens_out", 0), c.get("dollars", 0.0), stage.get("wall_time_s", 0.0)]
    return tuple(float(v) if isinstance(v, (int, float)) else 0.0 for v in vals)  # type: ignore[return-value]


