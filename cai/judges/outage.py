"""What a stage tells the user when its judge went away: one message for every judging stage.

A stage that asks a judge never records a transient failure (:func:`~cai.judges.types.is_transient`:
a timeout, a connection error, HTTP 408/409/429/5xx after the retries, an empty answer) as a final
result. It counts them in an :class:`Outage` and, at its end, raises the
:class:`~cai.errors.JudgeUnavailable` of :func:`outage_error` instead of publishing: the finished
results stay journaled, so a rerun of the same command asks only the failed requests again.
After :data:`DOWN_AFTER_BATCHES` batches in a row without an answer the judge is taken to be down
and the rest is not asked.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from cai.errors import JudgeUnavailable
from cai.judges.types import EMPTY_ANSWER, failure_kind

# after this many batches in a row without a finished record the judge is taken to be down
DOWN_AFTER_BATCHES = 2


def transient_kind(reason: str) -> str:
    """The kind an outage message counts a transient failure under (``http_500``, ``timeout``,
    ``connection``, ``empty_answer``)."""
    return "empty_answer" if reason.strip().lower().startswith(EMPTY_ANSWER) else failure_kind(reason)


@dataclass
class Outage:
    """The records a run left unfinished for transient reasons."""

    kinds: Counter = field(default_factory=Counter)  # failure kind -> records
    failed: int = 0  # records asked whose answers failed transiently
    not_asked: int = 0  # records never asked (the judge looked down)

    def add(self, reasons: Iterable[str]) -> int:
        """Count the transient failure ``reasons`` (one per record); returns how many."""
        reasons = list(reasons)
        self.failed += len(reasons)
        self.kinds.update(transient_kind(r) for r in reasons)
        return len(reasons)

    def __bool__(self) -> bool:
        return bool(self.failed or self.not_asked)


def outage_error(stage: str, outage: Outage, n_done: int, n_total: int, where: str, *,
                 unit: str = "pairs", done: str = "labelled") -> JudgeUnavailable:
    """The error ending a stage that ``outage`` left unfinished: how many of ``n_total`` ``unit``
    failed and why (the commonest kinds), how many were not asked, what to check (``where``: the
    judge's backend and address) and how to resume (``n_done`` ``done`` ``unit`` are kept)."""
    kinds = ", ".join(f"{k} x {n}" for k, n in outage.kinds.most_common(3))
    more = (f"; after {DOWN_AFTER_BATCHES} batches in a row without an answer the judge looked down and "
            f"{outage.not_asked} more {unit} were not asked" if outage.not_asked else "")
    return JudgeUnavailable(
        f"{stage}: {outage.failed} of {n_total} {unit} failed transiently (the judge or the network, not the "
        f"answers: {kinds}){more}; nothing was published. Check the judge ({where}) and rerun the same command: "
        f"the {n_done} {done} {unit} are kept and only the failed ones are asked again"
        + (f" (and the {outage.not_asked} not asked yet)" if outage.not_asked else "")
    )


def judge_where(backend: str, base_url: str | None, prefix: str = "judge") -> str:
    """``judge.backend=openai, judge.base_url=...``: where to look when the judge is down."""
    return f"{prefix}.backend={backend}" + (f", {prefix}.base_url={base_url}" if base_url else "")
