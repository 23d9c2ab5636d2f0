"""Reward models on human-labelled pair files: the metrics of one scored set, and their table.

A scorer (a trained reward model, or a DPO policy's implicit reward ``beta * (log pi - log ref)``)
gives every response of a pair file a reward; :func:`pair_set_metrics` turns the rewards of the
chosen and rejected sides into flat metrics named ``<model>/sets/<set>/<metric>``:

- ``pairs``: scored pairs; ``accuracy``: share of pairs whose chosen side scores higher (an exact
  tie counts half), with its 95% interval ``accuracy_ci_low``/``accuracy_ci_high`` (Wilson, via
  :func:`cai.stats.rate_ci`'s rule: BCa when ties make the scores fractional);
- ``ece``: expected calibration error of ``sigmoid(r_chosen - r_rejected)`` as P(chosen is better)
  (10 equal-width bins over both orientations of each pair, so the target is not always 1);
- ``margin``: mean ``r_chosen - r_rejected``;
- ``length_corr``: Spearman correlation of reward with response length (characters) over every
  scored response, and ``prefers_longer``: share of pairs with sides of unequal length where the
  higher-scored side is the longer (0.5: no length preference). Read them beside
  ``chosen_longer``, the share of pairs whose *human* choice is the longer side.

``<model>`` is ``rm`` (stage ``reward``), ``eval_rm`` (the held-out RM) or ``dpo`` (the DPO
policy's implicit reward). :func:`reward_eval_section` renders every such metric of a run (or of
several arms) as one RewardBench-style table in Markdown or HTML, for the report.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

METRICS = ("pairs", "accuracy", "accuracy_ci_low", "accuracy_ci_high", "ece", "margin", "length_corr",
           "prefers_longer", "chosen_longer")
MODEL_NAMES = {"rm": "reward model", "eval_rm": "held-out reward model (eval_reward)",
               "dpo": "DPO policy (implicit reward)"}
_KEY = re.compile(r"^(?P<model>.+)/sets/(?P<set>[^/]+)/(?P<metric>[a-z_]+)$")


def _ece(p: np.ndarray, target: np.ndarray, n_bins: int = 10) -> float:
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            total += m.mean() * abs(p[m].mean() - target[m].mean())
    return float(total)


def pair_set_metrics(r_chosen: Sequence[float], r_rejected: Sequence[float], len_chosen: Sequence[int],
                     len_rejected: Sequence[int], prefix: str) -> dict[str, float]:
    """The metrics of the module docstring under ``prefix`` (``"rm/sets/helpful-test"``)."""
    from scipy.stats import spearmanr

    from cai.stats import rate_ci

    rc, rr = np.asarray(r_chosen, dtype=float), np.asarray(r_rejected, dtype=float)
    lc, lr = np.asarray(len_chosen, dtype=float), np.asarray(len_rejected, dtype=float)
    n = len(rc)
    if not (len(rr) == len(lc) == len(lr) == n) or n == 0:
        raise ValueError(f"pair_set_metrics: need equal, non-zero lengths, got {n}, {len(rr)}, {len(lc)}, {len(lr)}")
    d = rc - rr
    correct = np.where(d == 0, 0.5, (d > 0).astype(float))
    low, high = rate_ci(correct)
    p = 1.0 / (1.0 + np.exp(-np.clip(d, -50.0, 50.0)))
    rewards, lengths = np.concatenate([rc, rr]), np.concatenate([lc, lr])
    corr = float(spearmanr(rewards, lengths).statistic) if np.ptp(rewards) > 0 and np.ptp(lengths) > 0 \
        else math.nan
    unequal = lc != lr
    longer_scores_higher = np.where(d == 0, 0.5, ((d > 0) == (lc > lr)).astype(float))[unequal]
    return {
        f"{prefix}/pairs": n,
        f"{prefix}/accuracy": float(correct.mean()),
        f"{prefix}/accuracy_ci_low": float(low),
        f"{prefix}/accuracy_ci_high": float(high),
        f"{prefix}/ece": _ece(np.concatenate([p, 1.0 - p]), np.concatenate([np.ones(n), np.zeros(n)])),
        f"{prefix}/margin": float(d.mean()),
        f"{prefix}/length_corr": corr,
        f"{prefix}/prefers_longer": float(longer_scores_higher.mean()) if unequal.any() else math.nan,
        f"{prefix}/chosen_longer": float((lc > lr)[unequal].mean()) if unequal.any() else math.nan,
    }


# ----------------------------------------------------------------------------- the table
def reward_eval_rows(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per (set, model) found in flat ``metrics``: ``{"set", "model", <metric>: value}``,
    sorted by set, then model."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for key, value in metrics.items():
        m = _KEY.match(key)
        if m and m["metric"] in METRICS:
            row = rows.setdefault((m["set"], m["model"]), {"set": m["set"], "model": m["model"]})
            row[m["metric"]] = value
    return [rows[k] for k in sorted(rows)]


def _num(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return "–"
    return str(int(value)) if float(value).is_integer() and abs(value) >= 1 and digits == 0 else f"{value:.{digits}f}"


def _cells(row: Mapping[str, Any]) -> list[str]:
    interval = "–"
    if isinstance(row.get("accuracy_ci_low"), (int, float)) and isinstance(row.get("accuracy_ci_high"), (int, float)):
        interval = f"[{_num(row['accuracy_ci_low'])}, {_num(row['accuracy_ci_high'])}]"
    return [_num(row.get("pairs"), 0), _num(row.get("accuracy")), interval, _num(row.get("ece")),
            _num(row.get("margin")), _num(row.get("length_corr")), _num(row.get("prefers_longer")),
            _num(row.get("chosen_longer"))]


HEADER = ("set", "model", "pairs", "accuracy", "95% interval", "ECE", "margin", "length corr",
          "prefers longer", "humans chose longer")
CAPTION = ("Reward models on human-labelled pair files: accuracy = share of pairs whose human-chosen response "
           "scores higher (ties count half), Wilson 95% interval; ECE of sigmoid(reward margin); length corr = "
           "Spearman correlation of reward with response length; prefers longer = share of pairs where the "
           "higher-scored response is the longer one (compare with how often humans chose the longer).")


def reward_set_cells(metrics: Mapping[str, Any]) -> list[list[str]]:
    """The table cells (set, model in words, then the numbers of :data:`HEADER`) of every scored set in
    one run's flat ``metrics``."""
    return [[row["set"], MODEL_NAMES.get(row["model"], row["model"]), *_cells(row)]
            for row in reward_eval_rows(metrics)]


def reward_eval_section(metrics: Mapping[str, Any], fmt: str = "md", title: str = "Reward models on pair files"
                        ) -> str:
    """The RewardBench-style table of every ``<model>/sets/<set>/...`` metric, as Markdown
    (``fmt="md"``) or an HTML fragment (``fmt="html"``); ``""`` when there is none.

    ``metrics`` is one run's flat metrics, or ``{arm name: flat metrics}`` for several arms (an
    "arm" column is added).
    """
    if fmt not in ("md", "html"):
        raise ValueError(f"reward_eval_section: fmt must be 'md' or 'html', got {fmt!r}")
    by_arm = metrics and all(isinstance(v, Mapping) for v in metrics.values())
    arms: Mapping[str, Mapping[str, Any]] = metrics if by_arm else {"": metrics}
    header = (("arm",) if by_arm else ()) + HEADER
    table: list[list[str]] = []
    for arm, arm_metrics in arms.items():
        table += [([arm] if by_arm else []) + cells for cells in reward_set_cells(arm_metrics)]
    if not table:
        return ""
    if fmt == "md":
        lines = [f"## {title}", "", CAPTION, "", "| " + " | ".join(header) + " |",
                 "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in table]
        return "\n".join(lines) + "\n"
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in cells) + "</tr>" for cells in table)
    return (f'<section class="reward-eval"><h2>{e(title)}</h2><p>{e(CAPTION)}</p>'
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></section>\n")
