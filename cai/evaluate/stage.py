"""The pipeline stage ``evaluate``: the arm's final policy against the baseline SFT policy.

One run of a study is one **arm** (``conf/arm/*.yaml``); its evaluated policy is the last
policy the run trains, in the order ``ppo`` > ``dpo`` > ``sft`` > the initial policy (the
``policy_model`` artifact for ``policy.name_or_path: tiny``, else the hub name or path). The
**baseline** is the initial policy: in the matched study it is the "SFT only" arm, the
instruction-tuned policy every other arm starts from. With ``eval.baseline: sft`` a run that
trains PPO or DPO on top of its own ``sft`` (the CAI recipe of the quickstart) is compared with
that SFT policy instead, which is also PPO's reference. On the TEST split of ``prompts`` (cut to
``eval.max_prompts``) the stage:

1. takes the baseline's samples (and its harmlessness verdicts) from stage ``eval_baseline``
   (:mod:`cai.evaluate.baseline`), built once per seed and shared by every arm, and samples one
   response per prompt from the arm with the same seeds; when the arm IS the baseline (the SFT
   arm) its samples are the baseline's, so its win rate is exactly 0.5 and its KL 0 by
   construction;
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
   and split salt, shared by every arm of a sweep), with the paired difference to the baseline.

Metrics: ``eval/vs_sft/{win_rate,lc_win_rate,...}`` (+ ``_ci_low``/``_ci_high``, counts),
``eval/harmless/...``, ``eval/harmless_sft/...``, ``eval/kl``, ``eval/length``,
``eval/sft_length``, ``eval/rm_score``, ``eval/rm_score_vs_sft``; ``eval/judge_is_labeller`` is
1 when the held-out judge's answer-changing fields equal the labeller's (the tiny offline
default), so a report can say the evaluation is not held out. ``samples.jsonl`` keeps every
prompt's two responses, log-probs and judgements.

Resumable: the arm's samples are journaled per batch and the judge's answers per request batch
(``eval.judge_batch``, run time only), as in ``eval_baseline``, so a killed evaluation rerun
re-samples and re-asks nothing already done and reports what an uninterrupted run reports.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import numpy as np

from cai.data import write_jsonl
from cai.errors import ConfigError, DataError
from cai.evaluate.baseline import (
    JudgeSession,
    arm_policy,
    baseline_kind,
    check_eval_config,
    eval_prompts,
    eval_runtime,
    harmless_indices,
    read_baseline,
    sample_policy,
)
from cai.judges.config import JudgeConfig
from cai.train.reward import RewardConfig

log = logging.getLogger(__name__)


def _tiny_judge() -> JudgeConfig:
    return JudgeConfig(backend="hf", model="tiny", api_key_env=None, max_concurrency=1)


def _eval_rm() -> RewardConfig:
    return RewardConfig(labels_from="human", split_salt="eval-rm")


@dataclass
class EvalConfig:
    """The ``evaluate`` stage (Hydra group ``eval``)."""

    # the held-out judge: a judge config that is not the labeller (``judge``); model "tiny": the tiny policy
    judge: JudgeConfig = field(default_factory=_tiny_judge)
    max_prompts: Optional[int] = None  # test prompts evaluated (None: all of the test split)
    max_new_tokens: int = 48
    temperature: float = 1.0  # 1.0 keeps the KL estimate unbiased
    top_p: float = 1.0
    stop: List[str] = field(default_factory=lambda: ["\n\nHuman:"])
    batch_size: int = 16
    question: Optional[str] = None  # None: cai.evaluate.requests.DEFAULT_COMPARISON_QUESTION
    harmless: bool = True
    harmless_question: Optional[str] = None  # None: DEFAULT_HARMLESS_QUESTION
    harmless_prompts: str = "harmful"  # harmful (prompts tagged harmful) | all
    ties: str = "half"  # half | excluded
    tie_margin: float = 0.0
    bootstrap_resamples: int = 2000
    kl: bool = True
    use_rm: bool = True  # score under a held-out RM trained on human labels (needs data.human.path)
    rm_seed_offset: int = 1000  # the held-out RM's seed is seed + this
    rm: RewardConfig = field(default_factory=_eval_rm)
    hf_batch_size: int = 8  # rows per forward of a local (hf) judge unless eval.judge.batch_size is set; run time only
    judge_batch: int = 64  # judge requests per call and per journal write; run time only
    # initial: the initial policy (the matched study's "SFT" arm); sft: the run's sft artifact when the
    # run trains beyond it (PPO/DPO from SL-CAI, as in the quickstart), else the initial policy
    baseline: str = "initial"


# ----------------------------------------------------------------------------- sampling and scoring
@dataclass
class Policy:
    name: str  # "ppo" | "dpo" | "sft" | "initial"
    location: str


def _seq_logprobs(engine: Any, policy_cfg: dict, location: str, device: str, batch_size: int,
                  texts: list[str], token_ids: list[list[int]]) -> list[float]:
    """Sequence log-probs (temperature 1) of given samples; loads the policy when ``engine`` is None."""
    from cai.generation.stages import load_engine

    if engine is None:
        engine, _ = load_engine(policy_cfg, location, device, batch_size)
    return [float(sum(lp)) for lp in engine.score(texts, token_ids)]


def _sample_arm(ctx: Any, cfg: dict[str, Any], prompts: list, arm: Policy, base: Policy,
                device: str) -> tuple[list[dict], list[float]]:
    """The arm's samples (journaled per batch) and, per prompt, ``log pi_arm(y) - log pi_base(y)``
    for its own sample ``y`` (zeros without ``eval.kl``). One model is in memory at a time."""
    ecfg, bs = cfg["eval"], int(cfg["eval"]["batch_size"])
    rows, engine = sample_policy(ctx, prompts, cfg["policy"], arm.location, device, ecfg, int(cfg["seed"]),
                                 arm.name, token_ids=True)
    if not ecfg["kl"]:
        return rows, [0.0] * len(rows)
    texts, ids = [r["prompt"] for r in rows], [r["token_ids"] for r in rows]
    with ctx.phase("kl"):
        lp_arm = _seq_logprobs(engine, cfg["policy"], arm.location, device, bs, texts, ids)
        del engine
        lp_base = _seq_logprobs(None, cfg["policy"], base.location, device, bs, texts, ids)
    return rows, [a - b for a, b in zip(lp_arm, lp_base)]


def _mean_ci(values: list[float], n_boot: int, seed: int) -> tuple[float, float, float]:
    from cai.stats import bootstrap_ci

    if not values:
        return math.nan, math.nan, math.nan
    low, high = bootstrap_ci(np.asarray(values, dtype=float), n=n_boot, seed=seed)
    return float(np.mean(values)), float(low), float(high)


# ----------------------------------------------------------------------------- judging
def _win_rates(judge: JudgeSession, prompts, arm_texts, base_texts, arm_len, base_len, arm_name, ecfg, seed):
    from cai.evaluate.winrates import Judgement, length_controlled_win_rate, win_rate
    from cai.evaluate.requests import DEFAULT_COMPARISON_QUESTION, comparison_requests, judgements_from_results

    question = ecfg.get("question") or DEFAULT_COMPARISON_QUESTION
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
    n_boot, ties, margin = int(ecfg["bootstrap_resamples"]), ecfg["ties"], float(ecfg["tie_margin"])
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


def _harmless(judge: JudgeSession, prompts, arm_texts, base_rows, arm_is_base: bool, arm_name, ecfg,
              seed) -> dict[str, float]:
    """Harmless rates of the arm and the baseline (whose answers ``eval_baseline`` holds)."""
    from cai.evaluate.requests import DEFAULT_HARMLESS_QUESTION, harmless_rate, harmlessness_request

    question = ecfg.get("harmless_question") or DEFAULT_HARMLESS_QUESTION
    chosen = harmless_indices(prompts, ecfg)
    base = _baseline_harmless(prompts, base_rows, chosen)
    arm = base if arm_is_base else judge.ask(
        [(f"harm:{prompts[i].id}", harmlessness_request(prompts[i], arm_texts[i], arm=arm_name, question=question))
         for i in chosen])
    n_boot = int(ecfg["bootstrap_resamples"])
    metrics: dict[str, float] = {"eval/harmless_prompts": len(chosen)}
    metrics.update(harmless_rate(arm, n_boot=n_boot, seed=seed).to_metrics("eval/harmless"))
    metrics.update(harmless_rate(base, n_boot=n_boot, seed=seed).to_metrics("eval/harmless_sft"))
    return metrics


def _rm_scores(artifact: Path, prompts, arm_texts, base_texts, ecfg, seed, device
               ) -> tuple[dict[str, float], list[float], list[float]]:
    """Metrics of the held-out RM's scores, and the per-prompt scores of the arm and the baseline."""
    from cai.evaluate.winrates import paired_comparison
    from cai.train.reward import RewardScorer

    scorer = RewardScorer.load(artifact, device=device)
    arm = scorer.score(prompts, arm_texts).rewards
    base = scorer.score(prompts, base_texts).rewards
    n_boot = int(ecfg["bootstrap_resamples"])
    mean, low, high = _mean_ci(arm, n_boot, seed)
    out = {"eval/rm_score": mean, "eval/rm_score_ci_low": low, "eval/rm_score_ci_high": high,
           "eval/sft_rm_score": float(np.mean(base)) if base else math.nan}
    if arm:
        pc = paired_comparison(arm, base, n_boot=n_boot, n_perm=2000, seed=seed)
        out.update({"eval/rm_score_vs_sft": pc.diff, "eval/rm_score_vs_sft_ci_low": pc.ci_low,
                    "eval/rm_score_vs_sft_ci_high": pc.ci_high, "eval/rm_score_vs_sft_p": pc.p_value})
    return out, [float(x) for x in arm], [float(x) for x in base]


# ----------------------------------------------------------------------------- the stage
def _sample_metrics(cfg: dict[str, Any], prompts, n_test: int, base: Policy, arm_rows, base_rows, kl,
                    n_boot: int, seed: int) -> dict[str, Any]:
    arm_len = [float(r["n_tokens"]) for r in arm_rows]
    metrics: dict[str, Any] = {"eval/prompts": len(prompts), "eval/prompts_beyond_limit": n_test - len(prompts),
                               "eval/judge_is_labeller": int(cfg["judge_is_labeller"]),
                               "eval/baseline_is_sft_artifact": int(base.name == "sft"),
                               "eval/empty_responses": sum(1 for r in arm_rows if not r["response"].strip())}
    mean, low, high = _mean_ci(arm_len, n_boot, seed)
    metrics.update({"eval/length": mean, "eval/length_ci_low": low, "eval/length_ci_high": high,
                    "eval/sft_length": float(np.mean([r["n_tokens"] for r in base_rows]))})
    if cfg["eval"]["kl"]:
        mean, low, high = _mean_ci(kl, n_boot, seed)
        metrics.update({"eval/kl": mean, "eval/kl_ci_low": low, "eval/kl_ci_high": high})
    return metrics


def evaluate(cfg: dict[str, Any], inputs: dict[str, Path], ctx: Any, runtime: Mapping[str, Any] | None = None) -> None:
    """Stage ``evaluate`` (see the module docstring). ``cfg``: ``{"eval", "policy", "arm", "seed",
    "judge_is_labeller"}``; ``runtime``: judge run-time fields, cache path, device, batch sizes."""
    from cai.generation.stages import policy_location

    runtime = dict(runtime or {})
    ecfg, seed, device = cfg["eval"], int(cfg["seed"]), runtime.get("device", "auto")
    with ctx.phase("load_data"):
        prompts, n_test = eval_prompts(inputs["prompts"], ecfg)
        base_rows = read_baseline(inputs["eval_baseline"], prompts)
    base = (Policy("sft", str(Path(inputs["baseline"]) / "model")) if "baseline" in inputs
            else Policy("initial", policy_location({"policy": cfg["policy"]}, inputs)))
    arm = Policy(cfg["arm"], str(Path(inputs["arm"]) / "model")) if "arm" in inputs else base
    if arm is base:  # the arm IS the baseline: the same samples, so KL 0 and every prompt a tie
        arm_rows, kl = base_rows, [0.0] * len(prompts)
    else:
        arm_rows, kl = _sample_arm(ctx, cfg, prompts, arm, base, device)
    arm_texts, base_texts = [r["response"] for r in arm_rows], [r["response"] for r in base_rows]
    arm_len, base_len = [r["n_tokens"] for r in arm_rows], [r["n_tokens"] for r in base_rows]
    n_boot = int(ecfg["bootstrap_resamples"])
    metrics = _sample_metrics(cfg, prompts, n_test, base, arm_rows, base_rows, kl, n_boot, seed)
    with JudgeSession(ctx, ecfg, inputs, runtime, "evaluate") as judge:
        with ctx.phase("judge"):
            wr, judgements = _win_rates(judge, prompts, arm_texts, base_texts, arm_len, base_len,
                                        arm.name, ecfg, seed)
            metrics.update(wr)
            if ecfg["harmless"]:
                metrics.update(_harmless(judge, prompts, arm_texts, base_rows, arm is base, arm.name, ecfg, seed))
        tokens_in, tokens_out, dollars = judge.cost()
    ctx.add_cost(tokens_in, tokens_out, dollars)
    metrics["eval/judge_cost_usd"] = dollars
    arm_rm = base_rm = [None] * len(prompts)
    if "eval_reward" in inputs:
        with ctx.phase("rm"):
            rm_metrics, arm_rm, base_rm = _rm_scores(inputs["eval_reward"], prompts, arm_texts, base_texts, ecfg,
                                                     seed, device)
            metrics.update(rm_metrics)
    rows = []
    for i, p in enumerate(prompts):
        j = judgements.get(p.id)
        rows.append({"prompt_id": p.id, "arm": arm.name, "arm_response": arm_texts[i], "sft_response": base_texts[i],
                     "arm_tokens": arm_len[i], "sft_tokens": base_len[i], "kl": kl[i],
                     "rm_score": arm_rm[i], "sft_rm_score": base_rm[i],
                     "p_first": j.p_first if j else None, "p_second": j.p_second if j else None,
                     "outcome": j.outcome(float(ecfg["tie_margin"])) if j else "invalid",
                     "failure": j.failure if j else "not judged"})
    with ctx.phase("write"):
        write_jsonl(ctx.dir / "samples.jsonl", rows)
    ctx.set_metrics(metrics)
    log.info("evaluate: the %s policy vs the baseline (%s) policy: win rate %.3f [%.3f, %.3f] on %d prompts",
             arm.name, base.name, metrics["eval/vs_sft/win_rate"], metrics["eval/vs_sft/win_rate_ci_low"],
             metrics["eval/vs_sft/win_rate_ci_high"], len(prompts))


def evaluate_stage(cfg) -> Any:
    """Pipeline builder: the ``evaluate`` stage for the composed config."""
    from omegaconf import OmegaConf

    from cai.judges.config import judge_key
    from cai.pipeline import Stage

    e = OmegaConf.to_container(cfg.eval, resolve=True)
    check_eval_config(e)  # a bad value (eval.judge's too) fails at planning, before any stage runs
    runtime = eval_runtime(cfg, e)  # e["judge"] is now the judge's key, runtime["judge"] the rest
    judge = e["judge"]
    rm = e.pop("rm")
    use_rm = bool(e.pop("use_rm")) and bool(cfg.data.human.path)
    e.pop("rm_seed_offset")
    inputs = {"prompts": "prompts", "eval_baseline": "eval_baseline"}
    if cfg.policy.name_or_path == "tiny" or judge.get("model") == "tiny":
        inputs["policy_model"] = "policy_model"
    arm = arm_policy(cfg)
    if arm is not None:
        inputs["arm"] = arm
    e["baseline"] = baseline_kind(cfg, arm)  # what the baseline actually is: part of the key and the metrics
    if e["baseline"] == "sft":
        inputs["baseline"] = "sft"
    if use_rm:
        inputs["eval_reward"] = "eval_reward"
        e["rm"] = {k: v for k, v in rm.items() if k != "device"}  # a different held-out RM: another key
    same = judge_key(OmegaConf.to_container(cfg.judge, resolve=True)) == judge
    policy = {k: v for k, v in OmegaConf.to_container(cfg.policy, resolve=True).items() if k != "device"}
    key = {"eval": e, "policy": policy, "arm": arm or "initial", "seed": int(cfg.seed), "judge_is_labeller": same}
    # version 2: samples.jsonl carries each prompt's held-out RM scores (rm_score, sft_rm_score)
    return Stage("evaluate", functools.partial(evaluate, runtime=runtime), key, inputs, version="2")


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


def build_eval_reward(cfg: dict[str, Any], inputs: dict[str, Path], ctx: Any,
                      runtime: Mapping[str, Any] | None = None) -> None:
    """Stage ``eval_reward``: the reward stage's trainer on human labels; metrics ``eval_rm/...``."""
    from cai.train.reward import build_reward

    build_reward(cfg, inputs, _RenamedMetrics(ctx, "rm/", "eval_rm/"), runtime=runtime)


def eval_reward_stage(cfg) -> Any:
    """Pipeline builder: the held-out reward model the ``evaluate`` stage scores with."""
    from omegaconf import OmegaConf

    from cai.pipeline import Stage
    from cai.train.reward import coerce_reward_config

    if not cfg.data.human.path:
        raise ConfigError("stage eval_reward trains on human labels: it needs data.human.path")
    rm = OmegaConf.to_container(cfg.eval.rm, resolve=True)
    rcfg = coerce_reward_config(rm)
    if rcfg.labels_from != "human":
        raise ConfigError(f"eval.rm.labels_from={rcfg.labels_from!r}: the held-out reward model is trained "
                          "on human labels; set it to 'human'")
    inputs = {"human_pairs": "human_pairs"}
    if rcfg.backbone == "tiny" and cfg.policy.name_or_path == "tiny":
        inputs["policy_model"] = "policy_model"
    key = {k: v for k, v in asdict(rcfg).items() if k != "device"}
    fn = functools.partial(build_eval_reward, runtime={"device": rcfg.device})
    return Stage("eval_reward", fn, {"reward": key, "seed": int(cfg.seed) + int(cfg.eval.rm_seed_offset)}, inputs)
