"""The AI-labelling stage ``ai_labels``: pairs + constitution + judge -> one label per pair.

For every input pair (``pairs.jsonl`` of the upstream artifact, records of :class:`cai.data.Pair`)
the stage draws the principles to ask (``labels.principles``: one weighted draw per pair,
seeded by ``seed`` and the pair id; an ensemble of ``k_principles``; or all of them), renders the
prompts (:mod:`cai.feedback.templates`) in one or both orders, sends them through the judge from
:func:`~cai.judges.make_judge` and combines the answers
(:mod:`cai.feedback.label_methods`). It writes ``labels.jsonl``: one :class:`cai.data.Label` per
input pair, in input order, with ``source = "ai:<backend>:<model>"``, ``p_a`` = the final
probability that ``response_a`` is better, and ``meta`` holding ``p_first``, ``p_a_by_order``,
``per_principle``, ``judge``, tokens, cost, cache hits and the judge's method (the format the
reward/DPO trainers and the label-quality stage read). Beside it, ``pairs.jsonl`` holds the
labelled pairs line for line (the input, cut at ``max_pairs``) and ``judge.json`` the judge
config (secrets scrubbed) and its cost ledger.

Pairs are judged ``batch_pairs`` at a time (all requests of a batch -- both orders, every
principle -- go to the judge together); each finished pair is journaled, so a killed run resumes
where it stopped, and the judge cache answers whatever was already asked: nothing finished is
sent twice. A failed judgement (refusal, unparseable answer, HTTP error after retries) makes a
``status="failed"`` label with the reason -- never a coin flip, never a missing row. When the
judge's dollar cap is reached, the finished pairs are journaled and the stage stops with
"stopped at budget: N of M pairs labelled; rerun to resume" (nothing is published).

Only what changes the labels is part of the artifact key (:func:`~cai.judges.config.judge_key`):
run-time settings of the judge (concurrency, rate limits, retries, timeouts, cache, prices,
``max_dollars``, a local judge's device and batch size) and of the stage
(``batch_pairs``, ``hf_batch_size``) reach it through ``runtime``, so raising a budget resumes the
same artifact instead of starting another.
"""

from __future__ import annotations

import functools
import json
import logging
import random
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from cai.artifacts import scrub_secrets
from cai.constitution import Constitution, PreferencePrinciple, load_constitution, resolve_constitution
from cai.data import Label, Pair, read_jsonl, write_jsonl
from cai.errors import CaiError, ConfigError
from cai.feedback import label_methods as lm
from cai.feedback import templates as tpl
from cai.judges import (
    BudgetExhausted,
    ChoiceRequest,
    ChoiceResult,
    CostLedger,
    GenerateRequest,
    coerce_config,
    make_judge,
    run_sync,
)
from cai.judges.config import SEMANTIC_FIELDS, judge_key, judge_runtime
from cai.judges.types import BUDGET
from cai.feedback.label_methods import LabelConfig, coerce_labels

log = logging.getLogger(__name__)

STAGE = "ai_labels"
# judge fields that change the answers (the rest is how fast / how much / where cached); the
# key of a judge is judge_key(...), which adds a non-default dtype of a local judge
SEMANTIC_JUDGE_FIELDS = SEMANTIC_FIELDS
RUNTIME_LABEL_FIELDS = ("batch_pairs", "hf_batch_size")


# ----------------------------------------------------------------------------- requests
Unit = tuple[str, str]  # (principle id, order "ab"/"ba") or (principle id, reply "a"/"b")
Outcome = Any  # a ChoiceResult, or a failure reason (str) when no choice request was sent


@dataclass
class _Plan:
    pair: Pair
    principles: list[PreferencePrinciple]
    outcomes: dict[Unit, list[Outcome]] = field(default_factory=dict)
    spent: list[Any] = field(default_factory=list)  # every result behind the label (for accounting)


def _ok(o: Outcome) -> bool:
    return isinstance(o, ChoiceResult) and o.ok and o.probs is not None


def _reason(o: Outcome) -> str:
    if o is None:
        return "no answer"
    return o if isinstance(o, str) else str(o.failure_reason or "no answer")


class Labeller:
    """Turns pairs into judge requests and judge answers into labels."""

    def __init__(self, lc: LabelConfig, constitution: Constitution, judge: Any, source: str, seed: int,
                 judge_info: dict) -> None:
        self.lc = lc
        self.constitution = constitution
        self.judge = judge
        self.source = source
        self.seed = seed
        self.judge_info = judge_info
        self.orders = list(lm.ORDERS) if lc.both_orders else ["ab"]
        examples = constitution.few_shot.preference if lc.few_shot else ()
        self.examples = tpl.cot_examples(examples) if lc.cot else list(examples)
        if lc.few_shot and not self.examples:
            what = "with a rationale (needed with cot)" if lc.cot else ""
            raise ConfigError(f"labels.few_shot: constitution {constitution.name!r} has no few_shot.preference "
                              f"examples {what}".rstrip())
        self.samples = lc.self_consistency
        self.temperature = (lc.cot_temperature if lc.cot_temperature is not None
                            else (0.0 if lc.self_consistency == 1 else 1.0))

    def plan(self, pair: Pair) -> _Plan:
        rng = random.Random(f"{self.seed}:{pair.id}")
        c = self.constitution
        if self.lc.principles == "all":
            chosen = list(c.preference)
        else:
            chosen = c.sample_preference(rng, 1 if self.lc.principles == "sample" else self.lc.k_principles)
        plan = _Plan(pair, chosen)
        keys = self.orders if self.lc.method == "pairwise" else ["a", "b"]
        n = self.samples if self.lc.method == "pairwise" else 1
        plan.outcomes = {(p.id, k): [None] * n for p in chosen for k in keys}
        return plan

    def _tag(self, plan: _Plan, unit: Unit, sample: int, step: str) -> dict:
        return {"stage": STAGE, "pair_id": plan.pair.id, "principle_id": unit[0], "order": unit[1],
                "sample": sample, "step": step, "template_version": tpl.TEMPLATE_VERSION}

    def _slots(self, plan: _Plan, unit: Unit) -> tuple[list[dict], str, str, str]:
        p = plan.pair
        first, second = (p.response_a, p.response_b) if unit[1] == "ab" else (p.response_b, p.response_a)
        question = self.constitution.preference_by_id(unit[0]).question
        return p.prompt.messages_as_dicts(), first, second, question

    def choice_request(self, plan: _Plan, unit: Unit) -> ChoiceRequest:
        if self.lc.method == "direct_score":
            p = plan.pair
            reply = p.response_a if unit[1] == "a" else p.response_b
            question = self.constitution.preference_by_id(unit[0]).question
            msgs = tpl.score_messages(p.prompt.messages_as_dicts(), reply, question)
            return ChoiceRequest(msgs, tpl.SCORE_CHOICES, tag=self._tag(plan, unit, 0, "score"))
        msgs = tpl.comparison_messages(*self._slots(plan, unit), few_shot=self.examples)
        return ChoiceRequest(msgs, tpl.PAIR_CHOICES, tag=self._tag(plan, unit, 0, "answer"))

    def reasoning_request(self, plan: _Plan, unit: Unit, sample: int) -> GenerateRequest:
        msgs = tpl.cot_request_messages(*self._slots(plan, unit), few_shot=self.examples)
        return GenerateRequest(msgs, max_tokens=self.lc.cot_max_tokens, temperature=self.temperature, seed=sample,
                               tag=self._tag(plan, unit, sample, "reasoning"))

    def answer_request(self, plan: _Plan, unit: Unit, sample: int, rationale: str) -> ChoiceRequest:
        msgs = tpl.cot_answer_messages(*self._slots(plan, unit), rationale, few_shot=self.examples)
        return ChoiceRequest(msgs, tpl.PAIR_CHOICES, tag=self._tag(plan, unit, sample, "answer"))

    # ---- one batch of pairs through the judge -------------------------------------------------
    async def judge_batch(self, plans: list[_Plan]) -> BudgetExhausted | None:
        """Fill every plan's outcomes; returns the BudgetExhausted that stopped the batch, if any."""
        stopped: BudgetExhausted | None = None
        choices: list[ChoiceRequest] = []
        where: list[tuple[_Plan, Unit, int]] = []
        if self.lc.cot:
            gens, gwhere = [], []
            for plan in plans:
                for unit, samples in plan.outcomes.items():
                    for s in range(len(samples)):
                        gens.append(self.reasoning_request(plan, unit, s))
                        gwhere.append((plan, unit, s))
            results, stopped = await _send(self.judge.generate_many, gens)
            for (plan, unit, s), g in zip(gwhere, results):
                plan.spent.append(g)
                if g.ok and g.text is not None:
                    choices.append(self.answer_request(plan, unit, s, g.text))
                    where.append((plan, unit, s))
                else:
                    reason = g.failure_reason or "no reasoning"
                    plan.outcomes[unit][s] = reason if reason == BUDGET else f"reasoning step: {reason}"
        else:
            for plan in plans:
                for unit in plan.outcomes:
                    choices.append(self.choice_request(plan, unit))
                    where.append((plan, unit, 0))
        results, stopped_choices = await _send(self.judge.choose_many, choices)
        for (plan, unit, s), r in zip(where, results):
            plan.spent.append(r)
            plan.outcomes[unit][s] = r
        return stopped or stopped_choices

    # ---- answers -> label ----------------------------------------------------------------------
    def label(self, plan: _Plan) -> Label | None:
        """The pair's label; None when part of it was never asked (stopped at the budget)."""
        flat = [o for samples in plan.outcomes.values() for o in samples]
        if any(_reason(o) == BUDGET for o in flat if not _ok(o)):
            return None
        pids = tuple(p.id for p in plan.principles)
        meta = self._accounting(plan)
        if self.lc.method == "direct_score":
            p_a, failure, kind_of = self._direct(plan, meta)
        else:
            p_a, failure, kind_of = self._pairwise(plan, meta)
        if failure is not None:
            meta["failure_kind"] = lm.failure_kind(kind_of or failure)
            return Label.failed(plan.pair.id, self.source, failure, pids, meta.pop("_order"), meta)
        return Label(plan.pair.id, lm.finish(p_a, self.lc.clamp, self.lc.soft), self.source, pids, meta.pop("_order"),
                     meta=meta)

    def _pairwise(self, plan: _Plan, meta: dict) -> tuple[float | None, str | None, str | None]:
        judgements = []
        for (pid, order), samples in plan.outcomes.items():
            probs = [o.probs[tpl.PAIR_CHOICES[0]] if _ok(o) else None for o in samples]
            p, failure = lm.average_samples(probs, [None if _ok(o) else _reason(o) for o in samples])
            judgements.append(lm.Judgement(pid, order, p, failure))
        c = lm.combine_pairwise(judgements, self.orders, self.lc.allow_single_order)
        meta.update(p_first=c.p_first, p_a_by_order=c.p_a_by_order, per_principle=c.per_principle, _order=c.order)
        if self.samples > 1:
            meta["samples_failed"] = sum(1 for s in plan.outcomes.values() for o in s if not _ok(o))
        return c.p_a, c.failure, lm.first_failure(judgements)

    def _direct(self, plan: _Plan, meta: dict) -> tuple[float | None, str | None, str | None]:
        per: dict[str, dict[str, float]] = {}
        failure = None
        for p in plan.principles:
            a, b = plan.outcomes[(p.id, "a")][0], plan.outcomes[(p.id, "b")][0]
            for slot, o in (("a", a), ("b", b)):
                if not _ok(o) and failure is None:
                    failure = (f"principle {p.id}, response_{slot}: {_reason(o)}", _reason(o))
            if _ok(a) and _ok(b):
                per[p.id] = {"p_a": lm.p_a_from_scores(a.probs, b.probs), "score_a": lm.expected_score(a.probs),
                             "score_b": lm.expected_score(b.probs)}
        # no orders here: per_principle maps a principle straight to its p_a
        meta.update(p_first={}, p_a_by_order={}, per_principle={k: v["p_a"] for k, v in per.items()},
                    scores_by_principle={k: {"score_a": v["score_a"], "score_b": v["score_b"]} for k, v in per.items()},
                    _order="both")
        if failure is not None:
            return None, failure[0], failure[1]
        meta["score_a"] = lm.mean(v["score_a"] for v in per.values())
        meta["score_b"] = lm.mean(v["score_b"] for v in per.values())
        return lm.mean(v["p_a"] for v in per.values()), None, None

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
def _judge_config(cfg: Mapping[str, Any], inputs: Mapping[str, Path], runtime: Mapping[str, Any]) -> dict:
    judge = {**dict(cfg["judge"]), **dict(runtime.get("judge") or {})}
    if judge.get("model") == "tiny":
        if "policy_model" not in inputs:
            raise ConfigError("judge.model 'tiny' needs the policy_model artifact as input (the pipeline adds it)")
        judge["model"] = str(Path(inputs["policy_model"]) / "model")
    return judge


def _metrics(labels: list[Label], unique: list[Label], run: dict[str, Any]) -> dict[str, Any]:
    ok = [lab for lab in labels if lab.status == "ok"]
    kinds = Counter(str(lab.meta.get("failure_kind", "unknown")) for lab in labels if lab.status != "ok")
    pos = lm.position_metrics(lab.meta for lab in ok if lab.meta.get("label_method") == "pairwise")
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


def _judge_all(labeller: Labeller, todo: list[Pair], journal: Any, batch_pairs: int, n_unique: int) -> None:
    """Judge ``todo`` in batches, journaling each finished pair; stop cleanly at the budget."""
    with tqdm(total=len(todo), desc=STAGE, unit="pair") as bar:
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


def label_pairs(cfg: dict[str, Any], inputs: dict[str, Path], ctx: Any, runtime: Mapping[str, Any] | None = None) -> None:
    """The ``ai_labels`` stage (see the module docstring).

    ``cfg``: ``{"judge": {...}, "labels": {...}, "seed": int}`` (the artifact key);
    ``runtime``: ``{"judge": {...run-time judge fields}, "labels": {batch_pairs, hf_batch_size},
    "constitution": name or path, "cache_path": judge cache file}``.
    """
    runtime = dict(runtime or {})
    lc = coerce_labels({**dict(cfg["labels"]), **dict(runtime.get("labels") or {})})
    judge_cfg = coerce_config(_judge_config(cfg, inputs, runtime), "judge")
    if not runtime.get("constitution"):
        raise ConfigError("ai_labels: no constitution given (runtime['constitution']: a name or a path)")
    constitution = load_constitution(resolve_constitution(runtime["constitution"]))
    with ctx.phase("read"):
        all_pairs = read_jsonl(Path(inputs["pairs"]) / "pairs.jsonl", cls=Pair)
    pairs = all_pairs[: lc.max_pairs] if lc.max_pairs is not None else all_pairs
    unique = list({p.id: p for p in pairs}.values())
    journal = ctx.journal("labels_journal.jsonl")
    todo = [p for p in unique if p.id not in journal]
    model_name = str(dict(cfg["judge"]).get("model"))
    source = f"ai:{judge_cfg.backend}:{model_name}"
    info = {"backend": judge_cfg.backend, "model": model_name, "template_version": tpl.TEMPLATE_VERSION}
    ledger = CostLedger(judge_cfg.prices, judge_cfg.max_dollars)
    judge = make_judge(judge_cfg, ledger=ledger, cache_path=runtime.get("cache_path"))
    if hasattr(judge, "batch_size") and judge_cfg.batch_size is None:  # judge.batch_size, when set, wins
        judge.batch_size = lc.hf_batch_size
    labeller = Labeller(lc, constitution, judge, source, int(cfg.get("seed", 0)), info)
    t0 = time.perf_counter()
    try:
        with ctx.phase("judge"):
            _judge_all(labeller, todo, journal, lc.batch_pairs, len(unique))
    finally:
        close = getattr(judge, "close", None)
        if close is not None:
            close()
    judged_s = time.perf_counter() - t0
    done = journal.done()
    with ctx.phase("write"):
        journal.export(ctx.dir / "labels.jsonl", [p.id for p in pairs])
        write_jsonl(ctx.dir / "pairs.jsonl", pairs)  # the labelled pairs, line for line
        totals = ledger.to_dict()
        record = {"judge": scrub_secrets(asdict(judge_cfg)), "source": source, "template_version": tpl.TEMPLATE_VERSION,
                  "ledger": totals, "hf_stats": dict(getattr(judge, "stats", {}) or {})}
        (ctx.dir / "judge.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    ctx.add_cost(totals["total"]["tokens_in"], totals["total"]["tokens_out"], totals["total"]["cost_usd"])
    labels = [Label.from_dict(done[p.id]) for p in pairs]
    run = {"label/pairs_beyond_limit": len(all_pairs) - len(pairs), "label/duplicate_pairs": len(pairs) - len(unique),
           "label/resumed": len(unique) - len(todo), "label/api_calls": totals["total"]["api_calls"],
           "label/labels_per_s": len(todo) / judged_s if todo and judged_s > 0 else None}
    if getattr(judge, "stats", None):
        run["label/judge_prompts_truncated"] = judge.stats.get("prompts_truncated", 0)
    metrics = _metrics(labels, [Label.from_dict(done[p.id]) for p in unique], run)
    ctx.set_metrics(metrics)
    log.info("ai_labels: %d pairs, %d ok, %d failed (%d resumed, %d answers from the judge, %d from the cache)",
             metrics["label/pairs"], metrics["label/ok"], metrics["label/failed"], run["label/resumed"],
             run["label/api_calls"], metrics["label/cache_hits"])


# ----------------------------------------------------------------------------- pipeline hook
def ai_labels_stage(cfg: Any) -> Any:
    """The ``ai_labels`` :class:`~cai.pipeline.Stage` of a composed config."""
    from omegaconf import OmegaConf

    from cai.artifacts import ArtifactStore
    from cai.config import CONSTITUTIONS_DIR
    from cai.pipeline import Stage

    labels = asdict(coerce_labels(cfg.labels))
    judge = OmegaConf.to_container(cfg.judge, resolve=True)
    coerce_config(judge, "judge")  # a bad judge setting fails at planning, before any stage runs
    inputs = {"pairs": labels["source"]}
    if judge.get("model") == "tiny":
        inputs["policy_model"] = "policy_model"
    root = cfg.store.root or ArtifactStore.default_root()
    runtime = {
        "judge": judge_runtime(judge),
        "labels": {k: labels[k] for k in RUNTIME_LABEL_FIELDS},
        "constitution": str(resolve_constitution(cfg.constitution.path, [CONSTITUTIONS_DIR])),
        "cache_path": str(Path(root).expanduser() / "judge_cache.sqlite"),
    }
    config = {
        "judge": judge_key(judge),
        "labels": {k: v for k, v in labels.items() if k not in RUNTIME_LABEL_FIELDS},
        "seed": int(cfg.seed),
    }
    return Stage(STAGE, functools.partial(label_pairs, runtime=runtime), config, inputs, uses_constitution=True)
