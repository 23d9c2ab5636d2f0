"""How good are the AI labels? Agreement with human labels, calibration, position bias, cost.

:func:`quality_report` joins AI labels (stage ``ai_labels``) and human labels (stage
``human_pairs``) by ``pair_id`` and measures, as flat ``quality/...`` metrics:

- ``agreement`` -- the RLAIF paper's *AI labeler alignment*: the share of pairs where the
  response the AI prefers is the one the human preferred. AI ties (``p_a == 0.5``) prefer
  nothing: they are counted in ``ties`` and left out of the denominator ``agreement_n``.
- ``soft_agreement`` -- the mean probability the AI gave to the human-preferred response (ties
  count as 0.5 here: a tie is a real answer of a soft labeler).
- ``ece`` -- expected calibration error of the judge's ``p_a`` as a forecast of the human's
  choice, over ``n_bins`` equal-width bins: ``sum_b n_b / N * |mean p_a - share human chose a|``.
  Swapping a pair's slots maps bin ``i`` onto bin ``n_bins - 1 - i`` with the same gap, so this
  is also the calibration of p(human-preferred). The per-bin table is in the report.
- Position bias, from the per-order probabilities the labeler keeps in ``meta["p_first"]``
  (P(slot 1 wins) with a shown first, ``"ab"``, and with b shown first, ``"ba"``), by
  :func:`cai.feedback.label_methods.position_metrics` -- the same function behind the labelling
  stage's ``label/...`` position metrics: ``position_consistency`` is the share of pairs judged
  in both orders whose *response* wins in both; ``same_slot_rate`` the share whose *slot* wins in
  both (the RLAIF paper's "same position preferred"); ``first_slot_rate`` the share of
  single-order judgements won by slot 1. An order judged exactly 0.5 decides nothing: such
  pairs/judgements are counted in ``position_ties`` / ``first_slot_ties`` and left out. These
  need no human label, so they use every AI label.
- ``principle/<id>/agreement`` (and ``/n``) from ``meta["per_principle"]`` (per order ``p_a``,
  averaged over the orders present); a label without it but with exactly one principle id
  counts its own ``p_a`` for that principle.
- ``invalid_rate`` and ``invalid/<code>`` over all AI labels; ``<code>`` is the failure kind
  the labeller recorded in ``meta["failure_kind"]``, else that of the failure reason
  (:func:`cai.judges.types.failure_kind`: ``refusal``, ``unparseable``, ``http_429``,
  ``timeout``, ``budget``, ...).
- ``cost_usd`` (sum of ``meta["cost_usd"]``) and ``cost_per_label_usd`` (per usable label).
- ``agreement_ci_low/high`` and ``soft_agreement_ci_low/high``: seeded percentile bootstrap
  over pairs (:func:`cai.stats.rate_ci`: Wilson, or BCa for soft agreement).

Nothing is dropped silently: AI labels without a human label (``unmatched_ai``), human labels
without an AI label (``unmatched_human``), failed labels and human ties are all counted. A metric
with no data is ``None``. Duplicate labels for one pair are an upstream bug and raise.

The pipeline stage ``label_quality`` (:func:`build_label_quality`) writes ``quality.json``
(metrics, reliability table, per-principle table, failure reasons) and sets the metrics.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cai.config import QualityConfig, StageConfig
from cai.data import Label, read_jsonl
from cai.errors import DataError
from cai.feedback.label_methods import meta_probability, position_metrics
from cai.judges.types import failure_kind
from cai.stats import rate_ci

P = "quality/"


@dataclass
class ReliabilityBin:
    """One row of the reliability table: AI ``p_a`` in ``[low, high)`` vs the human's choice."""

    low: float
    high: float
    n: int
    mean_p: float | None  # mean AI p_a in the bin
    human_a_rate: float | None  # share of the bin's pairs where the human chose a


@dataclass
class QualityReport:
    """Flat metrics plus the tables a report shows."""

    metrics: dict[str, Any]
    reliability: list[ReliabilityBin]
    principles: list[dict[str, Any]]
    invalid_reasons: dict[str, int]  # full failure reason -> count
    unmatched_ai_ids: list[str] = field(default_factory=list)  # first few, for the report

    def to_dict(self) -> dict[str, Any]:
        return {
            "metrics": self.metrics,
            "reliability": [asdict(b) for b in self.reliability],
            "principles": self.principles,
            "invalid_reasons": self.invalid_reasons,
            "unmatched_ai_ids": self.unmatched_ai_ids,
        }


# ----------------------------------------------------------------------------- helpers
def _index(labels: Iterable[Label], side: str) -> dict[str, Label]:
    out: dict[str, Label] = {}
    for i, label in enumerate(labels):
        if not isinstance(label, Label):
            raise DataError(f"{side} labels[{i}]: expected a cai.data.Label, got {type(label).__name__}")
        if label.pair_id in out:
            raise DataError(f"{side} labels[{i}]: a second label for pair {label.pair_id!r} "
                            "(expected one label per pair)")
        out[label.pair_id] = label
    return out


def principle_probs(label: Label) -> dict[str, float]:
    """``{principle_id: p_a}`` of one ok label (mean over the orders judged for each principle)."""
    per = label.meta.get("per_principle")
    out: dict[str, float] = {}
    if isinstance(per, Mapping) and per:
        for pid, orders in per.items():
            where = f"per_principle.{pid}"
            ps = ([meta_probability(orders.get(o), label, f"{where}.{o}") for o in ("ab", "ba")]
                  if isinstance(orders, Mapping) else [meta_probability(orders, label, where)])
            ps = [p for p in ps if p is not None]
            if ps:
                out[str(pid)] = sum(ps) / len(ps)
    elif len(label.principle_ids) == 1 and label.p_a is not None:
        out[label.principle_ids[0]] = label.p_a
    return out


def _mean(xs: list[float]) -> float | None:
    return float(np.mean(xs)) if xs else None


def _ci(values: list[float], cfg: QualityConfig, seed: int) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return rate_ci(values, n=cfg.bootstrap, seed=seed, alpha=cfg.alpha)


# ----------------------------------------------------------------------------- the metric groups
def reliability_table(
    ps: list[float], human_a: list[bool], n_bins: int = 10
) -> tuple[list[ReliabilityBin], float | None]:
    """Equal-width bins of ``p_a`` (1.0 falls in the last bin) and the ECE over them."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    bins: list[list[tuple[float, bool]]] = [[] for _ in range(n_bins)]
    for p, y in zip(ps, human_a):
        bins[min(int(np.floor(p * n_bins)), n_bins - 1)].append((p, y))
    table, ece, total = [], 0.0, len(ps)
    for i, rows in enumerate(bins):
        mean_p = _mean([p for p, _ in rows])
        rate = _mean([float(y) for _, y in rows])
        table.append(ReliabilityBin(i / n_bins, (i + 1) / n_bins, len(rows), mean_p, rate))
        if rows:
            ece += len(rows) / total * abs(mean_p - rate)  # type: ignore[operator]
    return table, (ece if total else None)


def invalid_metrics(labels: list[Label]) -> tuple[dict[str, Any], dict[str, int]]:
    """Failure rate overall and per reason code, over every AI label."""
    failed = [lab for lab in labels if lab.status == "failed"]
    n = len(labels)
    # the kind the labeller recorded is that of the judge's own reason (a pairwise label's reason
    # reads "order ab failed (principle p): <the judge's reason>")
    codes = Counter(str(lab.meta.get("failure_kind") or failure_kind(lab.failure_reason)) for lab in failed)
    metrics: dict[str, Any] = {P + "invalid_rate": len(failed) / n if n else None, P + "n_failed": len(failed)}
    for code, count in sorted(codes.items()):
        metrics[f"{P}invalid/{code}"] = count / n
    return metrics, dict(sorted(Counter(lab.failure_reason or "" for lab in failed).items()))


def principle_table(matched: list[tuple[Label, bool]]) -> list[dict[str, Any]]:
    """Agreement per principle over matched pairs (``human_a``: the human chose a)."""
    per: dict[str, dict[str, list[float]]] = {}
    for label, human_a in matched:
        for pid, p in principle_probs(label).items():
            row = per.setdefault(pid, {"hard": [], "soft": [], "ties": []})
            row["soft"].append(p if human_a else 1.0 - p)
            if p == 0.5:
                row["ties"].append(1.0)
            else:
                row["hard"].append(float((p > 0.5) == human_a))
    return [
        {"principle_id": pid, "agreement": _mean(r["hard"]), "n": len(r["hard"]),
         "soft_agreement": _mean(r["soft"]), "ties": len(r["ties"])}
        for pid, r in sorted(per.items())
    ]


def _cost(labels: list[Label], n_ok: int) -> dict[str, Any]:
    total = 0.0
    tokens_in = tokens_out = 0
    for lab in labels:
        total += float(lab.meta.get("cost_usd") or 0.0)
        tokens_in += int(lab.meta.get("tokens_in") or 0)
        tokens_out += int(lab.meta.get("tokens_out") or 0)
    return {
        P + "cost_usd": total,
        P + "cost_per_label_usd": total / n_ok if n_ok else None,
        P + "tokens_in": tokens_in,
        P + "tokens_out": tokens_out,
    }


# ----------------------------------------------------------------------------- the report
def quality_report(
    ai: Iterable[Label], human: Iterable[Label], cfg: QualityConfig | None = None, seed: int = 0
) -> QualityReport:
    """Every quality metric of ``ai`` labels against ``human`` labels (see the module docstring)."""
    cfg = cfg or QualityConfig()
    ai_by_id, human_by_id = _index(ai, "AI"), _index(human, "human")
    ai_list = list(ai_by_id.values())
    unmatched_ai = [pid for pid in ai_by_id if pid not in human_by_id]
    unmatched_human = sum(1 for pid in human_by_id if pid not in ai_by_id)

    hard: list[float] = []
    soft: list[float] = []
    ps: list[float] = []
    ys: list[bool] = []
    matched_ok: list[tuple[Label, bool]] = []
    ai_ties = human_ties = human_failed = matched_failed = 0
    for pid, label in ai_by_id.items():
        h = human_by_id.get(pid)
        if h is None:
            continue
        if h.status != "ok":
            human_failed += 1
            continue
        if h.chosen is None:
            human_ties += 1
            continue
        if label.status != "ok":
            matched_failed += 1
            continue
        human_a = h.chosen == "a"
        p = float(label.p_a)  # type: ignore[arg-type]
        matched_ok.append((label, human_a))
        ps.append(p)
        ys.append(human_a)
        soft.append(p if human_a else 1.0 - p)
        if label.chosen is None:
            ai_ties += 1
        else:
            hard.append(float((label.chosen == "a") == human_a))

    table, ece = reliability_table(ps, ys, cfg.n_bins)
    principles = principle_table(matched_ok)
    invalid, reasons = invalid_metrics(ai_list)
    agree_lo, agree_hi = _ci(hard, cfg, seed)
    soft_lo, soft_hi = _ci(soft, cfg, seed)
    n_ok = sum(1 for lab in ai_list if lab.status == "ok")

    metrics: dict[str, Any] = {
        P + "n_pairs": len(ai_list),
        P + "n_human": len(human_by_id),
        P + "n_matched": len(ai_by_id) - len(unmatched_ai),
        P + "unmatched_ai": len(unmatched_ai),
        P + "unmatched_human": unmatched_human,
        P + "matched_failed": matched_failed,
        P + "human_ties": human_ties,
        P + "human_failed": human_failed,
        P + "agreement": _mean(hard),
        P + "agreement_n": len(hard),
        P + "agreement_ci_low": agree_lo,
        P + "agreement_ci_high": agree_hi,
        P + "ties": ai_ties,
        P + "soft_agreement": _mean(soft),
        P + "soft_agreement_n": len(soft),
        P + "soft_agreement_ci_low": soft_lo,
        P + "soft_agreement_ci_high": soft_hi,
        P + "ece": ece,
        **{P + k: v for k, v in position_metrics(ai_list).items()},
        **invalid,
        **_cost(ai_list, n_ok),
    }
    for row in principles:
        metrics[f"{P}principle/{row['principle_id']}/agreement"] = row["agreement"]
        metrics[f"{P}principle/{row['principle_id']}/n"] = row["n"]
    return QualityReport(metrics, table, principles, reasons, unmatched_ai[:20])


def label_quality(ai: Iterable[Label], human: Iterable[Label], cfg: QualityConfig | None = None,
                  seed: int = 0) -> dict[str, Any]:
    """The flat ``quality/...`` metrics of :func:`quality_report`."""
    return quality_report(ai, human, cfg, seed).metrics


# ----------------------------------------------------------------------------- the stage
def _labels_file(artifact: Path, what: str) -> Path:
    for name in ("labels.jsonl", "labels.jsonl.gz"):
        if (artifact / name).is_file():
            return artifact / name
    raise DataError(f"{what} artifact {artifact} has no labels.jsonl (expected the labels of stage {what})")


def build_label_quality(cfg: StageConfig, inputs: dict[str, Path], ctx: Any) -> None:
    """Stage ``label_quality``: AI labels vs human labels -> ``quality.json`` and metrics.

    Reads ``cfg.seed`` and ``cfg.quality``; ``inputs["ai_labels"]`` must label the pairs of
    ``inputs["human_pairs"]`` (``labels.source: human_pairs``, checked when the run is planned).
    """
    with ctx.phase("read"):
        ai = read_jsonl(_labels_file(inputs["ai_labels"], "ai_labels"), Label)
        human = read_jsonl(_labels_file(inputs["human_pairs"], "human_pairs"), Label)
    with ctx.phase("metrics"):
        report = quality_report(ai, human, cfg.quality, seed=cfg.seed)
    if report.metrics[P + "n_matched"] == 0:
        raise DataError(
            f"label_quality: none of the {len(ai)} AI labels has a human label for its pair "
            f"({len(human)} human labels); the ai_labels stage must label the human_pairs pairs"
        )
    text = json.dumps(report.to_dict(), indent=2, sort_keys=True, allow_nan=False)
    (ctx.dir / "quality.json").write_text(text + "\n", encoding="utf-8")
    ctx.set_metrics(report.metrics)
