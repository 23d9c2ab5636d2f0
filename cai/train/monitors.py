"""Monitors that watch a PPO run (or a critic-free sibling's) and warn with a diagnosis, not just a number.

Each check reads one step's metrics (and its responses) and returns :class:`Warning_` records;
the loop logs them, counts them in ``ppo/warnings/<kind>`` and keeps them in ``warnings.jsonl``.
The checks, and what usually causes what they see:

- ``negative_kl``: the batch-mean KL is below ``-tolerance`` and below zero by more than three
  standard errors. With the ``k1`` estimator a single sequence can be negative, but a batch
  mean that is significantly negative almost
  always means the log-probs of the rollout and of the reference were computed under different
  sampling settings (temperature, top-k/top-p truncation, a different chat format or padding).
- ``kl_over_budget``: the per-sequence KL exceeds ``kl_budget``: the policy is drifting faster
  than the KL coefficient restrains it (raise ``kl_coef``, use the adaptive controller, lower
  the learning rate).
- ``length_drift``: mean response length moved by more than ``length_drift`` times from the
  first rollouts' (collapse towards empty responses or growth towards the token cap; the
  reward model likely rewards length).
- ``boilerplate``: one word n-gram appears in more than ``boilerplate_share`` of the batch's
  responses (the policy found a phrase the reward model likes: mode collapse / hacking).
- ``rm_judge_divergence``: over the last ``window`` held-out measurements, the reward model's
  score rose by more than ``rise`` while a held-out judge's score did not rise: the policy is
  exploiting the reward model, not getting better.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from cai.config import MonitorConfig


@dataclass
class Warning_:
    """One warning: which check, at which step, and what to look at."""

    kind: str
    step: int
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def top_ngram_share(texts: Sequence[str], n: int) -> tuple[float, str]:
    """The largest share of ``texts`` that contain one same word n-gram, and that n-gram."""
    counts: Counter[tuple[str, ...]] = Counter()
    for text in texts:
        words = text.split()
        counts.update({tuple(words[i:i + n]) for i in range(len(words) - n + 1)})
    if not counts or not texts:
        return 0.0, ""
    gram, count = counts.most_common(1)[0]
    return count / len(texts), " ".join(gram)


@dataclass
class PPOMonitors:
    """Stateful checks over a run (the state goes into the checkpoint for exact resume).

    ``namespace`` is the run's metric prefix and config section (``ppo``: reads
    ``ppo/objective/kl``, advises ``ppo.kl_coef``); a sibling trainer passes its own (``rloo``).
    """

    cfg: MonitorConfig
    kl_target: float
    baseline_length: float | None = None
    heldout: list[tuple[int, float, float]] = field(default_factory=list)  # (step, rm, judge)
    namespace: str = "ppo"

    def _budget(self) -> float:
        return self.cfg.kl_budget if self.cfg.kl_budget > 0 else 2.0 * self.kl_target

    def check(self, step: int, metrics: dict[str, float], texts: Sequence[str]) -> list[Warning_]:
        """Every check on one step's metrics (``<namespace>/...`` names) and responses."""
        out: list[Warning_] = []
        ns = self.namespace
        kl = metrics.get(f"{ns}/objective/kl", 0.0)
        stderr = metrics.get(f"{ns}/objective/kl_stderr", 0.0)
        if kl < -self.cfg.negative_kl_tolerance and kl + 3.0 * stderr < 0:
            out.append(Warning_("negative_kl", step, (
                f"mean KL(policy||reference) is {kl:.4f} < 0 (standard error {stderr:.4f}). A negative mean "
                "usually means the rollout "
                "log-probs and the reference log-probs were computed under different settings: "
                "temperature, top_k/top_p truncation, chat format or padding. Score both with the same "
                f"temperature on the full distribution ({ns}.recompute_logprobs=true does)")))
        if kl > self._budget():
            out.append(Warning_("kl_over_budget", step, (
                f"mean KL {kl:.3f} exceeds the budget {self._budget():.3f}: the policy moves away from the "
                f"reference faster than the penalty holds it. Raise {ns}.kl_coef, use "
                f"{ns}.kl_controller=adaptive, or lower {ns}.lr")))
        length = metrics.get(f"{ns}/response_length", 0.0)
        if self.baseline_length is None:
            self.baseline_length = max(length, 1e-6)
        elif length > 0 or self.baseline_length > 0:
            ratio = max(length, 1e-6) / self.baseline_length
            if ratio > self.cfg.length_drift or ratio < 1.0 / self.cfg.length_drift:
                out.append(Warning_("length_drift", step, (
                    f"mean response length {length:.1f} tokens vs {self.baseline_length:.1f} at the start "
                    f"({ratio:.2f}x): the reward likely depends on length (check the RM's length bias; "
                    f"{ns}.missing_eos_penalty curbs run-on responses)")))
        share, gram = top_ngram_share(texts, self.cfg.ngram)
        if len(texts) >= 4 and share > self.cfg.boilerplate_share:
            out.append(Warning_("boilerplate", step, (
                f"{share:.0%} of the responses contain the same {self.cfg.ngram}-gram {gram!r}: the policy is "
                "collapsing onto a phrase the reward favours (reward hacking or too little KL)")))
        return out

    def record_heldout(self, step: int, rm_score: float, judge_score: float) -> list[Warning_]:
        """Add a held-out measurement; warn when the RM rises and the judge does not."""
        self.heldout.append((step, float(rm_score), float(judge_score)))
        w = self.cfg.window
        if len(self.heldout) < w:
            return []
        first, last = self.heldout[-w], self.heldout[-1]
        rm_rise, judge_rise = last[1] - first[1], last[2] - first[2]
        if rm_rise > self.cfg.rise and judge_rise <= 0:
            return [Warning_("rm_judge_divergence", step, (
                f"reward-model score rose by {rm_rise:.3f} over steps {first[0]}..{last[0]} while the held-out "
                f"judge's score changed by {judge_rise:+.3f}: the policy is likely exploiting the reward model")) ]
        return []

    def state_dict(self) -> dict[str, Any]:
        return {"baseline_length": self.baseline_length, "heldout": [list(h) for h in self.heldout]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.baseline_length = state.get("baseline_length")
        self.heldout = [tuple(h) for h in state.get("heldout", [])]  # type: ignore[misc]
