"""The pipeline stages ``evaluate_<policy>``: one of the arm's policies against the baseline policy.

One run of a study is one **arm** (``conf/arm/*.yaml``); every policy it trains is evaluated, each
in its own stage and artifact, ``evaluate_ppo``, ``evaluate_dpo``, ``evaluate_sft`` (that stage's
artifact, ``inputs["arm"]``) or ``evaluate_initial`` (the ``policy_model`` artifact for
``policy.name_or_path: tiny``, else the hub name or path): ``eval.policies`` (default
``[trained]``) decides which, through :func:`cai.pipeline.evaluated_policies`. Their keys do not
hold the list, so adding a policy builds its evaluation and reuses the others. Stage
``evaluate`` (:func:`list_evaluations`), the one ``experiment.stages`` names, lists them. The
**baseline** is ``eval.baseline``: ``initial`` (in the matched study the "SFT
only" arm, the instruction-tuned policy every other arm starts from), or ``sft``: a run that
trains PPO or DPO on top of its own ``sft`` (the CAI recipe of the quickstart) is compared with
that SFT policy (``inputs["baseline"]``), which is also PPO's reference. On the TEST split of ``prompts`` (cut to
``eval.max_prompts``) the stage:

1. takes the baseline's samples (and its harmlessness verdicts) from stage ``eval_baseline``
   (:mod:`cai.evaluate.baseline`), built once per seed and shared by every arm, and samples one
   response per prompt from the arm with the same seeds; when the arm IS the baseline
   (the policy is ``eval.baseline``: the SFT arm) its samples are the baseline's, so
   its win rate is exactly 0.5 and its KL 0 by construction;
2. asks the held-out judge (``eval.judge``, a :class:`JudgeConfig` distinct from the labeller's
   ``judge``) to compare them in both orders (:mod:`cai.evaluate.requests`): win rate with
   ties and invalid answers counted apart, never as losses, and the length-controlled win rate,
   each with a 95% bootstrap interval over prompts (:mod:`cai.evaluate.winrates`);
3. asks the same judge whether each response to a red-team prompt (tag ``harmful``; all test
   prompts with ``eval.harmless_prompts: all``) is harmless: the harmless rate of the arm and
   of the baseline;
4. the KL to the baseline: the mean over prompts of ``log pi_arm(y|x) - log pi_sft(y|x)`` for the
   arm's own samples ``y`` (sequence log-probs through :meth:`SamplingEngine.score` at
   temperature 1; an unbiased estimate when ``eval.temperature`` is 1);
5. when human data is configured and ``eval.use_rm``, the score of every response under a
   held-out reward model trained on human labels (stage ``eval_reward``: its own seed offset
   and split salt, shared by every arm of a sweep), with the paired difference to the baseline;
6. when ``eval.truth`` names a known rule ``grade(question, reply)`` (a synthetic task's ground
   truth, :mod:`cai.evaluate.truth`), the grade of every response of the arm and of the
   baseline: the mean grade (BCa interval) and the share at the rule's lowest grade
   ``eval.truth_lowest`` (Wilson interval).

Metrics, namespaced by the policy (``<p>``: ppo, dpo, sft, initial):
``eval/<p>/vs_sft/{win_rate,lc_win_rate,...}`` (+ ``_ci_low``/``_ci_high``, counts),
``eval/<p>/harmless/...``, ``eval/<p>/harmless_sft/...``, ``eval/<p>/kl``, ``eval/<p>/length``,
``eval/<p>/sft_length``, ``eval/<p>/rm_score``, ``eval/<p>/rm_score_vs_sft``,
``eval/<p>/truth/{mean,lowest_rate,lowest,n}`` and the baseline's ``eval/<p>/truth_sft/...`` (with
``eval.truth``); ``eval/<p>/judge_is_labeller`` is
1 when the held-out judge's answer-changing fields (:func:`~cai.judges.config.judge_key`) equal
the labeller's (``judge``; the tiny offline default), so a report can say the evaluation is not
held out; ``eval/<p>/baseline_is_sft_artifact`` is 1 under ``eval.baseline: sft``. ``samples.jsonl``
keeps every prompt's two responses, log-probs, judgements and rule grades (``arm``: the policy). A run written
before policies had their own stages has one ``evaluate`` artifact and ``eval/...`` metrics;
:mod:`cai.report.runs` reads them as ``eval/<eval.policy>/...``.

What it reads (its row in :data:`cai.pipeline.STAGES`): ``seed``, ``policy`` (sampling and
scoring on ``policy.device``), ``judge`` (only to say whether it is ``eval.judge``) and ``eval``
but ``eval.policies`` and ``eval.policy`` (the held-out RM's settings are ``eval_reward``'s); ``eval.hf_batch_size`` and
``eval.judge_batch`` are run-time fields, never keyed.

Resumable: the arm's samples are journaled per batch and the judge's answers per request batch
(``eval.judge_batch``, run time only), as in ``eval_baseline``, so a killed evaluation rerun
re-samples and re-asks nothing already done and reports what an uninterrupted run reports.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cai.config import EVAL_STAGE_PREFIX, EVALUATED_POLICIES, EvalConfig, ModelConfig, StageConfig
from cai.data import write_jsonl
from cai.errors import ConfigError, DataError
from cai.evaluate.baseline import (
    JudgeSession,
    eval_prompts,
    harmless_indices,
    policy_artifact,
    read_baseline,
    sample_policy,
)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- sampling and scoring
@dataclass
class Policy:
    name: str  # "ppo" | "dpo" | "sft" | "initial"
    location: str


def _seq_logprobs(engine: Any, policy: ModelConfig, location: str, device: str, batch_size: int,
                  texts: list[str], token_ids: list[list[int]]) -> list[float]:
    """Sequence log-probs (temperature 1) of given samples; loads the policy when ``engine`` is None."""
    from cai.generation.stages import load_engine

    if engine is None:
        engine, _ = load_engine(policy, location, device, batch_size)
    return [float(sum(lp)) for lp in engine.score(texts, token_ids, progress=True)]


def _sample_arm(ctx: Any, cfg: StageConfig, prompts: list, arm: Policy, base: Policy) -> tuple[list[dict], list[float]]:
    """The arm's samples (journaled per batch) and, per prompt, ``log pi_arm(y) - log pi_base(y)``
    for its own sample ``y`` (zeros without ``eval.kl``). One model is in memory at a time."""
    ecfg, policy, device = cfg.eval, cfg.policy, cfg.policy.device
    bs = int(ecfg.batch_size)
    rows, engine = sample_policy(ctx, prompts, policy, arm.location, device, ecfg, int(cfg.seed), arm.name,
                                 token_ids=True)
    if not ecfg.kl:
        return rows, [0.0] * len(rows)
    texts, ids = [r["prompt"] for r in rows], [r["token_ids"] for r in rows]
    with ctx.phase("kl"):
        lp_arm = _seq_logprobs(engine, policy, arm.location, device, bs, texts, ids)
        del engine
        lp_base = _seq_logprobs(None, policy, base.location, device, bs, texts, ids)
    return rows, [a - b for a, b in zip(lp_arm, lp_base)]


def _mean_ci(values: list[float], n_boot: int, seed: int) -> tuple[float, float, float]:
    from cai.stats import bootstrap_ci

    if not values:
        return math.nan, math.nan, math.nan
    low, high = bootstrap_ci(np.asarray(values, dtype=float), n=n_boot, seed=seed)
    return float(np.mean(values)), float(low), float(high)


# ----------------------------------------------------------------------------- judging
def _win_rates(judge: JudgeSession, prompts, arm_texts, base_texts, arm_len, base_len, arm_name,
               ecfg: EvalConfig, seed):
    from cai.evaluate.requests import (
        DEFAULT_COMPARISON_QUESTION,
        comparison_requests,
        judgements_from_results,
    )
    from cai.evaluate.winrates import Judgement, length_controlled_win_rate, win_rate

    question = ecfg.question or DEFAULT_COMPARISON_QUESTION
    # identical responses cannot differ in quality: a tie by definition, not a question for the judge
    # (its two orders would sum to 1 only up to rounding, which a zero tie margin reads as a win or loss)
    same = {p.id for p, a, b in zip(prompts, arm_texts, base_texts) if a.strip() == b.strip()}
    asks = [(f"cmp:{r.tag['order']}:{p.id}", r) for p, a, b in zip(prompts, arm_texts, base_texts)
            if p.id not in same
            for r in comparison_requests(p, a, b, arm=arm_name, baseline="sft", question=question)]
    results = judge.ask(asks)
    judged = {j.prompt_id: j for j in
              judgements_from_results([r for _, r in asks], results).get((arm_name, "sft"), [])}
    judgements = [judged[p.id] if p.id not in same else Judgement(p.id, 0.5, 0.5) for p in prompts]
    n_boot, ties, margin = int(ecfg.bootstrap_resamples), ecfg.ties, float(ecfg.tie_margin)
    wr = win_rate(judgements, ties=ties, tie_margin=margin, n_boot=n_boot, seed=seed)
    diff = {p.id: a - b for p, a, b in zip(prompts, arm_len, base_len)}
    lc = length_controlled_win_rate(judgements, diff, ties=ties, tie_margin=margin,
                                    n_boot=max(n_boot // 4, 100), seed=seed)
    metrics = {**wr.to_metrics("eval/vs_sft"), **lc.to_metrics("eval/vs_sft"), "eval/vs_sft/identical": len(same)}
    return metrics, {j.prompt_id: j for j in judgements}


def _baseline_harmless(prompts, base_rows: list[dict], chosen: list[int]) -> list:
    from cai.judges import ChoiceResult

    missing = [prompts[i].id for i in chosen if not base_rows[i].get("harmless")]
    if missing:
        raise DataError(f"eval_baseline samples.jsonl: prompt {missing[0]!r} has no harmlessness answer "
                        f"(field 'harmless', {len(missing)} prompt(s)); delete the artifact to rebuild it")
    return [ChoiceResult(**base_rows[i]["harmless"]) for i in chosen]


def _harmless(judge: JudgeSession, prompts, arm_texts, base_rows, arm_is_base: bool, arm_name,
              ecfg: EvalConfig, seed) -> dict[str, float]:
    """Harmless rates of the arm and the baseline (whose answers ``eval_baseline`` holds)."""
    from cai.evaluate.requests import (
        DEFAULT_HARMLESS_QUESTION,
        harmless_rate,
        harmlessness_request,
    )

    question = ecfg.harmless_question or DEFAULT_HARMLESS_QUESTION
    chosen = harmless_indices(prompts, ecfg.harmless_prompts)
    base = _baseline_harmless(prompts, base_rows, chosen)
    arm = base if arm_is_base else judge.ask(
        [(f"harm:{prompts[i].id}", harmlessness_request(prompts[i], arm_texts[i], arm=arm_name, question=question))
         for i in chosen])
    n_boot = int(ecfg.bootstrap_resamples)
    metrics: dict[str, float] = {"eval/harmless_prompts": len(chosen)}
    metrics.update(harmless_rate(arm, n_boot=n_boot, seed=seed).to_metrics("eval/harmless"))
    metrics.update(harmless_rate(base, n_boot=n_boot, seed=seed).to_metrics("eval/harmless_sft"))
    return metrics


def _rm_scores(artifact: Path, prompts, arm_texts, base_texts, n_boot: int, seed, device
               ) -> tuple[dict[str, float], list[float], list[float]]:
    """Metrics of the held-out RM's scores, and the per-prompt scores of the arm and the baseline."""
    from cai.stats import paired_comparison
    from cai.train.reward import RewardScorer

    scorer = RewardScorer.load(artifact, device=device)
    arm = scorer.score(prompts, arm_texts).rewards
    base = scorer.score(prompts, base_texts).rewards
    mean, low, high = _mean_ci(arm, n_boot, seed)
    out = {"eval/rm_score": mean, "eval/rm_score_ci_low": low, "eval/rm_score_ci_high": high,
           "eval/sft_rm_score": float(np.mean(base)) if base else math.nan}
    if arm:
        pc = paired_comparison(arm, base, n_boot=n_boot, n_perm=2000, seed=seed)
        out.update({"eval/rm_score_vs_sft": pc.diff, "eval/rm_score_vs_sft_ci_low": pc.ci_low,
                    "eval/rm_score_vs_sft_ci_high": pc.ci_high, "eval/rm_score_vs_sft_p": pc.p_value})
    return out, [float(x) for x in arm], [float(x) for x in base]


# ----------------------------------------------------------------------------- the stage
def judge_is_labeller(cfg: StageConfig) -> bool:
    """Whether the held-out judge ``eval.judge`` changes no answer of the labeller ``judge``: their
    :func:`~cai.judges.config.judge_key` are equal (run-time fields do not count)."""
    from cai.judges.config import judge_key

    return judge_key(cfg.judge) == judge_key(cfg.eval.judge)


def _sample_metrics(cfg: StageConfig, prompts, n_test: int, arm_rows, base_rows, kl, n_boot: int,
                    seed: int) -> dict[str, Any]:
    arm_len = [float(r["n_tokens"]) for r in arm_rows]
    metrics: dict[str, Any] = {"eval/prompts": len(prompts), "eval/prompts_beyond_limit": n_test - len(prompts),
                               "eval/judge_is_labeller": int(judge_is_labeller(cfg)),
                               "eval/baseline_is_sft_artifact": int(cfg.eval.baseline == "sft"),
                               "eval/empty_responses": sum(1 for r in arm_rows if not r["response"].strip())}
    mean, low, high = _mean_ci(arm_len, n_boot, seed)
    metrics.update({"eval/length": mean, "eval/length_ci_low": low, "eval/length_ci_high": high,
                    "eval/sft_length": float(np.mean([r["n_tokens"] for r in base_rows]))})
    if cfg.eval.kl:
        mean, low, high = _mean_ci(kl, n_boot, seed)
        metrics.update({"eval/kl": mean, "eval/kl_ci_low": low, "eval/kl_ci_high": high})
    return metrics


def evaluate(cfg: StageConfig, inputs: dict[str, Path], ctx: Any) -> None:
    """Stage ``evaluate_<policy>`` (see the module docstring): that policy (``inputs["arm"]``
    unless initial) against the baseline ``eval.baseline`` (``inputs["baseline"]`` when sft),
    whose samples are ``inputs["eval_baseline"]``'s; the held-out RM ``inputs["eval_reward"]``
    when the pipeline made it an input."""
    from cai.evaluate.baseline import baseline_location
    from cai.generation.stages import policy_location
    from cai.judges.config import stage_judge

    ecfg, seed, device = cfg.eval, int(cfg.seed), cfg.policy.device
    policy = evaluated_policy(cfg.stage)
    ctx = _RenamedMetrics(ctx, "eval/", f"eval/{policy}/")
    with ctx.phase("load_data"):
        prompts, n_test = eval_prompts(inputs["prompts"], ecfg.max_prompts)
        base_rows = read_baseline(inputs["eval_baseline"], prompts)
    base = Policy(ecfg.baseline, baseline_location(cfg, inputs))
    arm_location = policy_artifact(inputs, "arm", policy, "eval.policies")
    arm = Policy(policy, arm_location if arm_location is not None else policy_location(cfg.policy, inputs))
    arm_is_base = policy == ecfg.baseline
    if arm_is_base:  # the arm IS the baseline: the same samples, so KL 0 and every prompt a tie
        arm_rows, kl = base_rows, [0.0] * len(prompts)
    else:
        arm_rows, kl = _sample_arm(ctx, cfg, prompts, arm, base)
    arm_texts, base_texts = [r["response"] for r in arm_rows], [r["response"] for r in base_rows]
    arm_len, base_len = [r["n_tokens"] for r in arm_rows], [r["n_tokens"] for r in base_rows]
    n_boot = int(ecfg.bootstrap_resamples)
    metrics = _sample_metrics(cfg, prompts, n_test, arm_rows, base_rows, kl, n_boot, seed)
    judge = stage_judge(ecfg.judge, inputs, "eval.judge")
    with JudgeSession(ctx, judge, stage="evaluate", cache_path=cfg.judge_cache, judge_batch=ecfg.judge_batch,
                      hf_batch_size=ecfg.hf_batch_size) as session:
        with ctx.phase("judge"):
            wr, judgements = _win_rates(session, prompts, arm_texts, base_texts, arm_len, base_len,
                                        arm.name, ecfg, seed)
            metrics.update(wr)
            if ecfg.harmless:
                metrics.update(_harmless(session, prompts, arm_texts, base_rows, arm_is_base, arm.name, ecfg, seed))
        tokens_in, tokens_out, dollars = session.cost()
    ctx.add_cost(tokens_in, tokens_out, dollars)
    metrics["eval/judge_cost_usd"] = dollars
    arm_grade = base_grade = [None] * len(prompts)
    if ecfg.truth:  # the known rule's grades of both sides (cai.evaluate.truth)
        from cai.evaluate.truth import grade_replies, load_rule, truth_metrics

        rule, lowest = load_rule(ecfg.truth), float(ecfg.truth_lowest)
        arm_grade = grade_replies(rule, prompts, arm_texts)
        base_grade = grade_replies(rule, prompts, base_texts)
        metrics.update(truth_metrics(arm_grade, lowest, "eval/truth", n_boot, seed))
        metrics.update(truth_metrics(base_grade, lowest, "eval/truth_sft", n_boot, seed))
    arm_rm = base_rm = [None] * len(prompts)
    if "eval_reward" in inputs:
        with ctx.phase("rm"):
            rm_metrics, arm_rm, base_rm = _rm_scores(inputs["eval_reward"], prompts, arm_texts, base_texts, n_boot,
                                                     seed, device)
            metrics.update(rm_metrics)
    rows = []
    for i, p in enumerate(prompts):
        j = judgements.get(p.id)
        rows.append({"prompt_id": p.id, "arm": arm.name, "arm_response": arm_texts[i], "sft_response": base_texts[i],
                     "arm_tokens": arm_len[i], "sft_tokens": base_len[i], "kl": kl[i],
                     "rm_score": arm_rm[i], "sft_rm_score": base_rm[i],
                     "truth_grade": arm_grade[i], "sft_truth_grade": base_grade[i],
                     "p_first": j.p_first if j else None, "p_second": j.p_second if j else None,
                     "outcome": j.outcome(float(ecfg.tie_margin)) if j else "invalid",
                     "failure": j.failure if j else "not judged"})
    with ctx.phase("write"):
        write_jsonl(ctx.dir / "samples.jsonl", rows)
    ctx.set_metrics(metrics)
    log.info("evaluate: the %s policy vs the baseline (%s) policy: win rate %.3f [%.3f, %.3f] on %d prompts",
             arm.name, base.name, metrics["eval/vs_sft/win_rate"], metrics["eval/vs_sft/win_rate_ci_low"],
             metrics["eval/vs_sft/win_rate_ci_high"], len(prompts))


def evaluated_policy(stage: str) -> str:
    """The policy stage ``evaluate_<policy>`` evaluates (its row in :data:`cai.pipeline.STAGES`)."""
    policy = stage.removeprefix(EVAL_STAGE_PREFIX)
    if not stage.startswith(EVAL_STAGE_PREFIX) or policy not in EVALUATED_POLICIES:
        raise ConfigError(f"stage {stage!r}: an evaluation stage is named {EVAL_STAGE_PREFIX}<policy>, policy one of "
                          f"{', '.join(EVALUATED_POLICIES)}")
    return policy


def list_evaluations(cfg: StageConfig, inputs: dict[str, Path], ctx: Any) -> None:
    """Stage ``evaluate``: the evaluations of this arm (``inputs``: policy -> its ``evaluate_<policy>``
    artifact), listed in ``evaluations.json`` with the baseline; each one is its own artifact, so
    this stage is all that is rebuilt when the list of policies changes."""
    import json

    listing = {"baseline": cfg.eval.baseline,
               "policies": [{"policy": p, "artifact": Path(folder).name} for p, folder in inputs.items()]}
    (ctx.dir / "evaluations.json").write_text(json.dumps(listing, indent=2, sort_keys=True) + "\n")
    ctx.set_metrics({"eval/policies_evaluated": len(inputs)})


# ----------------------------------------------------------------------------- held-out reward model
class _RenamedMetrics:
    """A build context whose metrics are renamed (the held-out RM's ``rm/...`` must not collide
    with the arm's own reward stage); everything else is the wrapped context's."""

    def __init__(self, ctx: Any, old: str, new: str) -> None:
        self._ctx, self._old, self._new = ctx, old, new

    def set_metrics(self, metrics: Mapping[str, Any]) -> None:
        self._ctx.set_metrics({(self._new + k[len(self._old):] if k.startswith(self._old) else k): v
                               for k, v in metrics.items()})

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ctx, name)


def build_eval_reward(cfg: StageConfig, inputs: dict[str, Path], ctx: Any) -> None:
    """Stage ``eval_reward``: the reward stage's trainer on the human labels (``inputs["human_pairs"]``)
    with the held-out RM's settings ``eval.rm`` and seed ``seed + eval.rm_seed_offset``; metrics
    ``eval_rm/...``."""
    from cai.train.reward import build_reward_model

    build_reward_model(cfg.eval.rm, int(cfg.seed) + int(cfg.eval.rm_seed_offset), inputs,
                       _RenamedMetrics(ctx, "rm/", "eval_rm/"))
