"""Reward functions for PPO and its critic-free siblings: a trained reward model, or a judge's
direct 1-10 score (d-RLAIF).

Both follow :data:`RewardFn`: ``reward_fn(conversations, completions) ->
ScoredBatch`` with one shaped score per response (``None`` when it could not be scored: the
loop counts it in ``ppo/reward_failed`` and leaves the response out of the update), the raw
scores, and metrics of their own. A reward function scores each response on its own: with ``k``
samples per prompt the rollout passes each conversation ``k`` times, once per response. Metric names (and
the judge's cost ledger stage) start with ``namespace`` (``ppo`` unless a sibling passes its own).

- :class:`RMReward` scores with a reward artifact (:class:`cai.train.reward.RewardScorer`)
  and shapes with :func:`cai.train.rl_math.shape_scores`: ``(r - mean) / std`` with the RM's
  saved ``reward_stats.json`` (so the reward is in units of the RM's spread over its training
  responses), times ``reward_scale``, clipped to ``reward_clip``.
- :class:`JudgeScoreReward` is direct RLAIF (Lee et al. 2023): the judge rates each response
  1-10 against preference principles sampled from the constitution (the ``score_messages``
  template of :mod:`cai.judges.templates`, choices ``"1"``..``"10"``); the reward is the
  expected score under the judge's distribution, ``sum_i p(i) * i``, averaged over principles
  and mapped to ``[-1, 1]`` by ``(s - 5.5) / 4.5``. Principles are drawn with an RNG seeded by
  the (conversation, response) pair, so a resumed run asks the same questions.

  A judge failure that is *transient* (:func:`cai.judges.types.is_transient`: a timeout, a
  connection error, HTTP 429/5xx after the judge's own retries, an empty answer) says nothing
  about the response, so it never turns into a missing reward: those requests are asked again,
  up to ``transient_rounds`` more times with a doubling pause (``transient_pause_s``, 2x, 4x,
  ...), and when some still fail the step stops with :class:`~cai.errors.JudgeUnavailable`
  (the run resumes from its last checkpoint once the judge is back). Only permanent failures (a
  refusal, an unparseable answer) leave a response unscored, counted in ``<ns>/judge/failed``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from cai.hashing import stable_hash
from cai.judges import templates as tpl
from cai.judges.outage import Outage, outage_error
from cai.judges.types import ChoiceRequest, failure_kind, is_transient, run_sync
from cai.train.rl_math import shape_scores

SCORE_MID, SCORE_HALF_RANGE = 5.5, 4.5


# ----------------------------------------------------------------------------- the interface
@dataclass
class ScoredBatch:
    """What a reward function returns: one score per response (``None``: failed, counted and
    left out of the update), the unshaped scores for logs, and extra metrics (cost, failures)."""

    scores: list[Optional[float]]
    raw: list[Optional[float]]
    metrics: dict[str, float] = field(default_factory=dict)


#: ``reward_fn(conversations, completions) -> ScoredBatch``; conversations are chat-message lists
RewardFn = Callable[[Sequence[list[dict]], Sequence[Any]], ScoredBatch]


class RMReward:
    """Scores from a reward-model artifact, normalised with its saved statistics."""

    def __init__(self, scorer, normalize: bool = True, scale: float = 1.0, clip: float = 10.0,
                 batch_size: int = 32, *, namespace: str = "ppo") -> None:
        self.scorer, self.normalize, self.scale, self.clip, self.batch_size = scorer, normalize, scale, clip, batch_size
        self.namespace = namespace

    def __call__(self, conversations: Sequence[list[dict]], completions: Sequence[Any]) -> ScoredBatch:
        out = self.scorer.score(list(conversations), [c.text for c in completions], batch_size=self.batch_size)
        raw = torch.tensor(out.rewards, dtype=torch.float32)
        stats = self.scorer.stats
        shaped = shape_scores(raw, float(stats["mean"]), float(stats["std"]), self.normalize, self.scale, self.clip)
        metrics = {f"{self.namespace}/objective/rm_member_std": float(torch.tensor(out.std).mean())} if len(
            self.scorer.models) > 1 else {}
        return ScoredBatch(shaped.tolist(), raw.tolist(), metrics)


def expected_score(probs: dict[str, float]) -> float:
    """``sum_i p(i) * i`` over the labels ``"1"``..``"10"`` (probabilities renormalised)."""
    total = sum(probs.get(c, 0.0) for c in tpl.SCORE_CHOICES)
    if total <= 0:
        raise ValueError(f"judge probabilities put no mass on 1..10: {probs}")
    return sum(int(c) * probs.get(c, 0.0) for c in tpl.SCORE_CHOICES) / total


class JudgeScoreReward:
    """d-RLAIF: the judge's expected 1-10 score of each response, online."""

    def __init__(self, judge, constitution, principles_per_response: int = 1, seed: int = 0,
                 scale: float = 1.0, clip: float = 10.0, *, namespace: str = "ppo",
                 transient_rounds: int = 4, transient_pause_s: float = 2.0) -> None:
        if not constitution.preference:
            raise ValueError("the constitution has no preference principles to score against")
        self.judge, self.constitution = judge, constitution
        self.k, self.seed, self.scale, self.clip = principles_per_response, seed, scale, clip
        self.namespace = namespace
        self.transient_rounds, self.transient_pause_s = transient_rounds, transient_pause_s

    def _ask(self, reqs: list[ChoiceRequest]) -> tuple[list, int]:
        """The judge's results for ``reqs``, transient failures asked again (see the module
        docstring); raises JudgeUnavailable when some still fail. Also returns how many
        requests were asked again."""
        results = list(run_sync(self.judge.choose_many(reqs)))
        cost = [r.cost_usd for r in results]
        retried = 0
        for round_ in range(self.transient_rounds + 1):
            pending = [i for i, r in enumerate(results) if not r.ok and is_transient(r.failure_reason)]
            if not pending:
                break
            if round_ == self.transient_rounds:
                outage = Outage()
                outage.add(results[i].failure_reason or "" for i in pending)
                judge = self.judge
                where = f"{self.namespace}: judge {getattr(judge, 'name', '?')}:{getattr(judge, 'model', '?')}"
                raise outage_error(f"{self.namespace} judge reward", outage, len(results) - len(pending),
                                   len(results), where, unit="score requests", done="answered")
            time.sleep(self.transient_pause_s * (2 ** round_))
            retried += len(pending)
            again = run_sync(self.judge.choose_many([reqs[i] for i in pending]))
            for i, res in zip(pending, again):
                cost[i] += res.cost_usd
                results[i] = res
        for i, res in enumerate(results):  # what every attempt cost, not only the last
            res.cost_usd = cost[i]
        return results, retried

    def _principles(self, conversation: list[dict], text: str):
        rng = random.Random(stable_hash([self.seed, conversation, text]))
        return self.constitution.sample_preference(rng, self.k)

    def requests(self, conversations: Sequence[list[dict]], texts: Sequence[str]) -> list[tuple[int, ChoiceRequest]]:
        """``(response index, request)`` for every sampled principle of every response."""
        out = []
        for i, (conv, text) in enumerate(zip(conversations, texts)):
            for p in self._principles(list(conv), text):
                msgs = tpl.score_messages(list(conv), text, p.question)
                tag = {"stage": self.namespace, "principle_id": p.id, "template_version": tpl.TEMPLATE_VERSION,
                       "response": i}
                out.append((i, ChoiceRequest(msgs, tpl.SCORE_CHOICES, tag=tag)))
        return out

    def __call__(self, conversations: Sequence[list[dict]], completions: Sequence[Any]) -> ScoredBatch:
        texts = [c.text for c in completions]
        reqs = self.requests(conversations, texts)
        results, retried = self._ask([r for _, r in reqs])
        per: list[list[float]] = [[] for _ in texts]
        failed = cost = 0.0
        reasons: dict[str, int] = {}
        for (i, _), res in zip(reqs, results):
            if res.ok and res.probs:
                per[i].append(expected_score(res.probs))
            else:
                failed += 1
                key = failure_kind(res.failure_reason)
                reasons[key] = reasons.get(key, 0) + 1
            cost += res.cost_usd
        raw = [sum(s) / len(s) if s else None for s in per]
        shaped = [None if r is None else float(shape_scores(torch.tensor((r - SCORE_MID) / SCORE_HALF_RANGE), 0.0, 1.0,
                                                            False, self.scale, self.clip)) for r in raw]
        ns = self.namespace
        metrics = {f"{ns}/judge/requests": float(len(reqs)), f"{ns}/judge/failed": failed,
                   f"{ns}/judge/retried_transient": float(retried), f"{ns}/judge/cost_usd": cost}
        metrics.update({f"{ns}/judge/failed/{k}": float(v) for k, v in sorted(reasons.items())})
        return ScoredBatch(shaped, raw, metrics)


class ScriptedReward:
    """A reward for tests and sanity runs: the share of response tokens in ``token_set``,
    times ``scale`` (a property the policy can learn, with a known optimum)."""

    def __init__(self, token_set: set[int], scale: float = 1.0) -> None:
        self.token_set, self.scale = set(token_set), scale

    def __call__(self, conversations: Sequence[list[dict]], completions: Sequence[Any]) -> ScoredBatch:
        s = [self.scale * sum(t in self.token_set for t in c.token_ids) / max(len(c.token_ids), 1)
             for c in completions]
        return ScoredBatch(list(s), list(s))
