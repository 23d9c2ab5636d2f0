"""The AI-labelling stage ``ai_labels``: pairs + constitution + judge -> one label per pair.

For every input pair (``pairs.jsonl`` of the upstream artifact, records of :class:`cai.data.Pair`)
the stage draws the principles to ask (``labels.principles``: one weighted draw per pair,
seeded by ``seed`` and the pair id; an ensemble of ``k_principles``; or all of them), renders the
prompts (:mod:`cai.judges.templates`) the labelling method asks for -- pairwise in one or both
orders, chain of thought, or direct scores (:mod:`cai.feedback.label_methods`, one class each) --
sends them through the judge from :func:`~cai.judges.make_judge` and lets the method combine the
answers. It writes ``labels.jsonl``: one :class:`cai.data.Label` per
input pair, in input order, with ``source = "ai:<backend>:<model>"``, ``p_a`` = the final
probability that ``response_a`` is better, and ``meta`` holding ``p_first``, ``p_a_by_order``,
``per_principle``, ``judge``, tokens, cost, cache hits and the judge's method (the format the
reward/DPO trainers and the label-quality stage read). Beside it, ``pairs.jsonl`` holds the
labelled pairs line for line (the input, cut at ``max_pairs``) and ``judge.json`` the judge
config (secrets scrubbed) and its cost ledger.

Pairs are judged ``batch_pairs`` at a time (all requests of a batch -- both orders, every
principle -- go to the judge together); each finished pair is journaled, so a killed run resumes
where it stopped, and the judge cache answers whatever was already asked: nothing finished is
sent twice. A judgement that failed because of the answer (a refusal, an unparseable answer, a
prompt that does not fit) makes a ``status="failed"`` label with the reason -- never a coin flip,
never a missing row; when more than ``labels.max_failed_fraction`` of the pairs have one, the
stage stops with an error naming the share (:class:`~cai.errors.TooManyFailures`; the labels stay
journaled, so a rerun with a higher threshold publishes them without asking again). A judgement
that failed because of the judge or the network (a timeout, a connection error, HTTP 429 or 5xx
after the judge's retries, an empty answer: :func:`~cai.judges.types.is_transient`) is never
journaled: the pair is asked again on the next run, and the stage ends with
:class:`~cai.errors.JudgeUnavailable` (how many pairs, the commonest reasons, how to resume)
instead of publishing. After two batches in a row with no pair finished, the judge is taken to
be down and the rest is not asked. When the judge's dollar cap is reached, the finished pairs are
journaled and the stage stops with "stopped at budget: N of M pairs labelled; rerun to resume"
(nothing is published either way).

Only what changes the labels is part of the artifact key (the stage's row in
:data:`cai.pipeline.STAGES` reads ``seed``, ``judge`` and ``labels``; the schemas' run-time fields
stay out of it): run-time settings of the judge (concurrency, rate limits, retries, timeouts,
cache, prices, ``max_dollars``, a local judge's device and batch size) and of the stage
(``batch_pairs``, ``hf_batch_size``) are read from the same ``cfg`` but never keyed, so raising a
budget resumes the same artifact instead of starting another.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cai import progress
from cai.artifacts import scrub_secrets
from cai.config import LabelConfig, StageConfig
from cai.constitution import Constitution, PreferencePrinciple, load_constitution
from cai.data import Label, Pair, read_jsonl, write_jsonl
from cai.errors import CaiError, ConfigError, TooManyFailures
from cai.feedback import label_methods as lm
from cai.judges import (
    BudgetExhausted,
    ChoiceRequest,
    ChoiceResult,
    CostLedger,
    GenerateRequest,
    make_judge,
    ready_judge,
    run_sync,
)
from cai.judges import templates as tpl
from cai.judges.config import stage_judge
from cai.judges.outage import DOWN_AFTER_BATCHES, Outage, judge_where, outage_error
from cai.judges.types import BUDGET, failure_kind, is_transient

log = logging.getLogger(__name__)

STAGE = lm.STAGE


# ----------------------------------------------------------------------------- the labeller
@dataclass
class _Plan:
    pair: Pair
    principles: list[PreferencePrinciple]
    answers: dict[lm.Key, lm.Answer] = field(default_factory=dict)  # in the order the method asked
    spent: list[Any] = field(default_factory=list)  # every result behind the label (for accounting)


class Labeller:
    """Turns pairs into judge requests and judge answers into labels, through the labelling
    method the config picks (:func:`~cai.feedback.label_methods.method_for`)."""

    def __init__(self, lc: LabelConfig, constitution: Constitution, judge: Any, source: str, seed: int,
                 judge_info: dict) -> None:
        self.lc = lc
        self.constitution = constitution
        self.judge = judge
        self.source = source
        self.seed = seed
        self.judge_info = judge_info
        self.method = lm.method_for(lc, constitution)

    def plan(self, pair: Pair) -> _Plan:
        """The principles to ask about ``pair``: drawn from a generator seeded by the pair."""
        rng = random.Random(f"{self.seed}:{pair.id}")
        c = self.constitution
        if self.lc.principles == "all":
            chosen = list(c.preference)
        else:
            chosen = c.sample_preference(rng, 1 if self.lc.principles == "sample" else self.lc.k_principles)
        return _Plan(pair, chosen)

    # ---- one batch of pairs through the judge -------------------------------------------------
    async def judge_batch(self, plans: list[_Plan]) -> BudgetExhausted | None:
        """Fill every plan's answers; returns the BudgetExhausted that stopped the batch, if any.

        Each round sends the requests of every pair of the batch together; the method's follow-up
        requests (chain of thought: the letter after the reasoning) make the next round."""
        stopped: BudgetExhausted | None = None
        pending: list[tuple[_Plan, lm.Key, lm.Request]] = []
        for plan in plans:
            for key, request in self.method.requests(plan.pair, plan.principles):
                plan.answers[key] = None
                pending.append((plan, key, request))
        while pending:
            results, stop = await self._send_round([request for _, _, request in pending])
            stopped = stopped or stop
            asked, pending = pending, []
            for (plan, key, _), result in zip(asked, results):
                plan.spent.append(result)
                step = self.method.follow_up(plan.pair, key, result)
                if isinstance(step, (ChoiceRequest, GenerateRequest)):
                    pending.append((plan, key, step))
                else:
                    plan.answers[key] = step
        return stopped

    async def _send_round(self, requests: list[lm.Request]) -> tuple[list, BudgetExhausted | None]:
        """One round: the free-text requests in one ``generate_many`` call, the choice requests in
        one ``choose_many`` call; the results in request order."""
        results: list[Any] = [None] * len(requests)
        stopped: BudgetExhausted | None = None
        for kind, send in ((GenerateRequest, self.judge.generate_many), (ChoiceRequest, self.judge.choose_many)):
            where = [i for i, r in enumerate(requests) if isinstance(r, kind)]
            got, stop = await _send(send, [requests[i] for i in where])
            stopped = stopped or stop
            for i, result in zip(where, got):
                results[i] = result
        return results, stopped

    # ---- answers -> label ----------------------------------------------------------------------
    def label(self, plan: _Plan) -> Label | None:
        """The pair's label; None when part of it was never asked (stopped at the budget) or a
        request behind it failed transiently (:meth:`transient`): the pair is asked again later."""
        if any(lm.why(a) == BUDGET for a in plan.answers.values() if not lm.answered(a)):
            return None
        if self.transient(plan) is not None:
            return None
        pids = tuple(p.id for p in plan.principles)
        meta = self._accounting(plan)
        verdict = self.method.combine(plan.pair, plan.principles, plan.answers)
        meta.update(verdict.meta)
        if verdict.failure is not None:
            meta["failure_kind"] = failure_kind(verdict.cause or verdict.failure)
            return Label.failed(plan.pair.id, self.source, verdict.failure, pids, verdict.order, meta)
        p_a = lm.finish(verdict.p_a, self.lc.clamp, self.lc.soft)  # type: ignore[arg-type]
        return Label(plan.pair.id, p_a, self.source, pids, verdict.order, meta=meta)

    @staticmethod
    def transient(plan: _Plan) -> str | None:
        """The reason of the first request behind the pair that failed transiently (the judge
        or the network, not the answer: :func:`~cai.judges.types.is_transient`), else None.
        Any such failure holds the whole label back -- even one a method could label without
        (``allow_single_order``, self-consistency) -- so a rerun makes the label a run without
        the outage would have made."""
        return next((str(r.failure_reason) for r in plan.spent
                     if not r.ok and is_transient(r.failure_reason)), None)

    def _accounting(self, plan: _Plan) -> dict:
        methods = Counter(r.method for r in plan.spent if isinstance(r, ChoiceResult) and r.ok)
        meta: dict[str, Any] = {
            "judge": self.judge_info, "label_method": self.lc.method,
            "method": methods.most_common(1)[0][0] if methods else "",
            "tokens_in": sum(r.tokens_in for r in plan.spent), "tokens_out": sum(r.tokens_out for r in plan.spent),
            "cost_usd": sum(r.cost_usd for r in plan.spent), "cache_hits": sum(bool(r.cache_hit) for r in plan.spent),
            "requests": len(plan.spent), "attempts": sum(int(r.attempts) for r in plan.spent),
        }
        if len(methods) > 1:
            meta["methods"] = dict(methods)
        return meta


async def _send(fn: Any, reqs: list) -> tuple[list, BudgetExhausted | None]:
    if not reqs:
        return [], None
    try:
        return list(await fn(reqs, progress=False)), None
    except BudgetExhausted as exc:
        return list(exc.results), exc


# ----------------------------------------------------------------------------- the stage
def _metrics(labels: list[Label], unique: list[Label], run: dict[str, Any]) -> dict[str, Any]:
    ok = [lab for lab in labels if lab.status == "ok"]
    kinds = Counter(str(lab.meta.get("failure_kind", "unknown")) for lab in labels if lab.status != "ok")
    pos = lm.position_metrics(labels)  # the ok labels with slots (direct scores have none)
    m: dict[str, Any] = {
        "label/pairs": len(labels), "label/ok": len(ok), "label/failed": len(labels) - len(ok),
        "label/mean_p_a": lm.mean(lab.p_a for lab in ok) if ok else None,  # type: ignore[misc]
        "label/cost_usd": sum(float(lab.meta.get("cost_usd", 0.0)) for lab in unique),
        "label/tokens_in": sum(int(lab.meta.get("tokens_in", 0)) for lab in unique),
        "label/tokens_out": sum(int(lab.meta.get("tokens_out", 0)) for lab in unique),
        "label/cache_hits": sum(int(lab.meta.get("cache_hits", 0)) for lab in unique),
        "label/attempts": sum(int(lab.meta.get("attempts", 0)) for lab in unique),
    }
    m.update({f"label/{k}": v for k, v in pos.items()})
    m.update({f"label/failed_{k}": v for k, v in sorted(kinds.items())})
    m.update(run)
    return m


def _judge_all(labeller: Labeller, todo: list[Pair], journal: Any, batch_pairs: int, n_unique: int) -> Outage:
    """Judge ``todo`` in batches, journaling each finished pair; stop cleanly at the budget.

    Pairs with a transient failure are not journaled but counted in the returned :class:`~cai.judges.outage.Outage`;
    after :data:`DOWN_AFTER_BATCHES` batches in a row with no finished pair the rest is not asked."""
    outage = Outage()
    idle = 0
    with progress.bar(total=len(todo), desc=STAGE, unit="pair") as bar:
        for start in range(0, len(todo), batch_pairs):
            plans = [labeller.plan(p) for p in todo[start : start + batch_pairs]]
            stopped = run_sync(labeller.judge_batch(plans))
            finished = [(pl.pair.id, lab.to_dict()) for pl in plans if (lab := labeller.label(pl)) is not None]
            journal.append_many(finished)
            bar.update(len(finished))
            if stopped is not None:
                raise CaiError(
                    f"stopped at budget: {len(journal)} of {n_unique} pairs labelled; rerun to resume "
                    f"(${stopped.spent_usd:.4f} spent of judge.max_dollars=${stopped.cap_usd:.4f}; finished pairs "
                    "are journaled and answered requests cached)"
                )
            reasons = [r for pl in plans if (r := labeller.transient(pl)) is not None]
            outage.add(reasons)
            idle = idle + 1 if reasons and not finished else 0
            if idle >= DOWN_AFTER_BATCHES:
                outage.not_asked = len(todo) - start - len(plans)
                if outage.not_asked:
                    log.warning("ai_labels: %d batches in a row without an answer; the judge looks down: %d pairs "
                                "not asked", idle, outage.not_asked)
                break
    return outage


def _check_failed_fraction(labels: list[Label], limit: float) -> None:
    failed = [lab for lab in labels if lab.status != "ok"]
    if not labels or len(failed) / len(labels) <= limit:
        return
    kinds = Counter(str(lab.meta.get("failure_kind", "unknown")) for lab in failed).most_common(3)
    raise TooManyFailures(
        f"ai_labels: {len(failed)} of {len(labels)} pairs ({len(failed) / len(labels):.1%}) have a failed label "
        f"({', '.join(f'{k} x {n}' for k, n in kinds)}), more than labels.max_failed_fraction={limit:g}; "
        "nothing was published. The labels are journaled: to publish them anyway rerun with a larger "
        "labels.max_failed_fraction (nothing is asked again); to have fewer, look at the failure reasons "
        "(a refusing or badly prompted judge)"
    )


def truth_agreement(truth: str, pairs: list[Pair], labels: list[Label]) -> dict[str, float | int | None]:
    """``labels.truth``: how the labels agree with a known rule ``truth(question, reply) -> number``
    (the last user turn and each reply). Of the decided labels (ok, p_a != 0.5): ``truth_agreement``
    is the share whose winner the rule grades strictly higher (a pair it grades equal counts as a
    disagreement, and is also counted in ``truth_ties``), with its Wilson 95% interval
    (``_ci_low``/``_ci_high``); ``truth_n`` how many were decided."""
    from cai.judges.python_judge import load_callable
    from cai.stats import wilson_ci

    grade = load_callable(truth, "labels.truth")
    agree = ties = n = 0
    for pair, label in zip(pairs, labels):
        if label.p_a is None or label.p_a == 0.5:
            continue
        a, b = (grade(pair.prompt.question, r.strip()) for r in (pair.response_a, pair.response_b))
        n += 1
        ties += a == b
        agree += a != b and (a > b) == (label.p_a > 0.5)
    low, high = wilson_ci(agree, n) if n else (None, None)
    return {"label/truth_agreement": agree / n if n else None, "label/truth_agreement_ci_low": low,
            "label/truth_agreement_ci_high": high, "label/truth_n": n, "label/truth_ties": ties}


def label_pairs(cfg: StageConfig, inputs: dict[str, Path], ctx: Any) -> None:
    """The ``ai_labels`` stage (see the module docstring).

    Reads ``cfg.seed``, ``cfg.judge`` (``model: tiny``: the tiny policy, ``inputs["policy_model"]``),
    ``cfg.labels`` and the constitution ``cfg.constitution_file``; labels ``inputs["pairs"]``.
    """
    lc: LabelConfig = cfg.labels
    judge_cfg = ready_judge(stage_judge(cfg.judge, inputs, "judge"), "judge")
    if cfg.constitution_file is None:
        raise ConfigError("ai_labels: no constitution file (its row in cai.pipeline.STAGES uses the constitution)")
    constitution = load_constitution(cfg.constitution_file)
    with ctx.phase("read"):
        all_pairs = read_jsonl(Path(inputs["pairs"]) / "pairs.jsonl", cls=Pair)
    pairs = all_pairs[: lc.max_pairs] if lc.max_pairs is not None else all_pairs
    unique = list({p.id: p for p in pairs}.values())
    journal = ctx.journal("labels_journal.jsonl")
    todo = [p for p in unique if p.id not in journal]
    model_name = cfg.judge.model  # the configured name ("tiny"), not the artifact path it stands for
    source = f"ai:{judge_cfg.backend}:{model_name}"
    info = {"backend": judge_cfg.backend, "model": model_name, "template_version": tpl.TEMPLATE_VERSION}
    ledger = CostLedger(judge_cfg.prices, judge_cfg.max_dollars)
    judge = make_judge(judge_cfg, ledger=ledger, cache_path=cfg.judge_cache)
    if hasattr(judge, "batch_size") and judge_cfg.batch_size is None:  # judge.batch_size, when set, wins
        judge.batch_size = lc.hf_batch_size
    labeller = Labeller(lc, constitution, judge, source, cfg.seed, info)
    t0 = time.perf_counter()
    try:
        with ctx.phase("judge"):
            outage = _judge_all(labeller, todo, journal, lc.batch_pairs, len(unique))
    finally:
        close = getattr(judge, "close", None)
        if close is not None:
            close()
    judged_s = time.perf_counter() - t0
    if outage:
        raise outage_error(STAGE, outage, len(journal), len(unique), judge_where(judge_cfg.backend, judge_cfg.base_url))
    done = journal.done()
    _check_failed_fraction([Label.from_dict(done[p.id]) for p in unique], lc.max_failed_fraction)
    with ctx.phase("write"):
        journal.export(ctx.dir / "labels.jsonl", [p.id for p in pairs])
        write_jsonl(ctx.dir / "pairs.jsonl", pairs)  # the labelled pairs, line for line
        totals = ledger.to_dict()
        record = {"judge": scrub_secrets(asdict(judge_cfg)), "source": source, "template_version": tpl.TEMPLATE_VERSION,
                  "ledger": totals, "hf_stats": dict(getattr(judge, "stats", {}) or {})}
        (ctx.dir / "judge.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    labels = [Label.from_dict(done[p.id]) for p in pairs]
    run = {"label/pairs_beyond_limit": len(all_pairs) - len(pairs), "label/duplicate_pairs": len(pairs) - len(unique),
           "label/resumed": len(unique) - len(todo), "label/api_calls": totals["total"]["api_calls"],
           "label/labels_per_s": len(todo) / judged_s if todo and judged_s > 0 else None}
    if getattr(judge, "stats", None):
        run["label/judge_prompts_truncated"] = judge.stats.get("prompts_truncated", 0)
    metrics = _metrics(labels, [Label.from_dict(done[p.id]) for p in unique], run)
    # the artifact's whole cost, attempts before a resume included (each label's meta carries what it
    # was paid), not only this process's ledger
    ctx.add_cost(metrics["label/tokens_in"], metrics["label/tokens_out"], metrics["label/cost_usd"])
    if lc.truth:
        metrics.update(truth_agreement(lc.truth, pairs, labels))
    ctx.set_metrics(metrics)
    log.info("ai_labels: %d pairs, %d ok, %d failed (%d resumed, %d answers from the judge, %d from the cache)",
             metrics["label/pairs"], metrics["label/ok"], metrics["label/failed"], run["label/resumed"],
             run["label/api_calls"], metrics["label/cache_hits"])
