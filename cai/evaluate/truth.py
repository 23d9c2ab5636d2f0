"""``eval.truth``: the evaluated replies graded by a known rule (a synthetic task's ground truth).

``eval.truth: "module:function"`` names a rule ``grade(question, reply) -> number`` (the last user
turn of the prompt and the stripped reply), e.g. :func:`cai.testing.preference_task.task_grade`
(2 on task and courteous, 1 on task and rude, 0 off task or broken). It is the evaluation's
counterpart of ``labels.truth``: where the task's truth is known, it says directly how good each
policy's replies are, without a judge. Stage ``evaluate_<policy>`` grades the policy's replies
(metrics ``eval/<policy>/truth/...``) and the baseline's (``eval/<policy>/truth_sft/...``), and
stage ``eval_baseline`` the baseline's once per seed (``eval/baseline/truth/...``):

- ``mean``: the mean grade, with its 95% BCa bootstrap interval over prompts
  (``mean_ci_low``/``mean_ci_high``, :func:`cai.stats.bootstrap_ci`);
- ``lowest_rate``: the share of replies graded at or below ``eval.truth_lowest`` (the rule's
  lowest grade, 0 for ``task_grade``: the off-task and broken replies), with its Wilson 95%
  interval (``lowest_rate_ci_low``/``_ci_high``) and count ``lowest``;
- ``n``: how many replies were graded (every evaluation prompt).

Like ``labels.truth``, the rule's source (:func:`cai.judges.python_judge.source_digest`) enters the
key of every stage that reads ``eval.truth``, so editing the rule re-grades; the pipeline checks
that it imports and is callable when the run is planned.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from cai.data import Prompt
from cai.errors import DataError


def grade_replies(rule: Callable[[str, str], Any], prompts: Sequence[Prompt], replies: Sequence[str],
                  where: str = "eval.truth") -> list[float]:
    """The rule's grade of each reply (stripped) to its prompt's question; a grade that is not a
    finite number stops the stage with a :class:`DataError` naming ``where`` and the prompt."""
    grades = []
    for prompt, reply in zip(prompts, replies, strict=True):
        value = rule(prompt.question, reply.strip())
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if isinstance(value, bool) or not math.isfinite(number):
            raise DataError(f"{where}: the rule graded the reply to prompt {prompt.id!r} {value!r}; it must "
                            "return a finite number")
        grades.append(number)
    return grades


def truth_metrics(grades: Sequence[float], lowest: float, prefix: str, n_boot: int, seed: int
                  ) -> dict[str, float | int]:
    """``<prefix>/mean`` (BCa interval), ``<prefix>/lowest_rate`` (Wilson interval), ``<prefix>/lowest``
    and ``<prefix>/n`` of the grades (see the module docstring); NaN rates for no grades."""
    from cai.stats import bootstrap_ci, wilson_ci

    n = len(grades)
    at_lowest = sum(1 for g in grades if g <= lowest)
    if n:
        mean = float(np.mean(grades))
        low, high = bootstrap_ci(np.asarray(grades, dtype=float), n=n_boot, seed=seed)
        rate_low, rate_high = wilson_ci(at_lowest, n)
    else:
        mean = low = high = rate_low = rate_high = math.nan
    return {f"{prefix}/mean": mean, f"{prefix}/mean_ci_low": float(low), f"{prefix}/mean_ci_high": float(high),
            f"{prefix}/lowest_rate": at_lowest / n if n else math.nan, f"{prefix}/lowest_rate_ci_low": rate_low,
            f"{prefix}/lowest_rate_ci_high": rate_high, f"{prefix}/lowest": at_lowest, f"{prefix}/n": n}


def load_rule(spec: str) -> Callable[[str, str], Any]:
    """The callable ``eval.truth`` names (a :class:`~cai.errors.ConfigError` naming it if it cannot)."""
    from cai.judges.python_judge import load_callable

    return load_callable(spec, "eval.truth")
