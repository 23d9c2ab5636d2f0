"""``cai compare PATH``: head-to-head win rates between the arms of a sweep, by the held-out judge.

Each arm's evaluation compares the arm's policies with the baseline only. This command
compares the arms with each other: for a sweep folder (or any folder of runs, found and named as
:mod:`cai.report.build` does), it groups the runs by seed and, for every pair of arms of one seed whose
``evaluate`` artifacts exist, asks the runs' held-out judge (``eval.judge``) which of the two
arms' headline policies' (``eval.policy``, else the last of ppo, dpo, sft evaluated) responses to each
test prompt is better -- in both orders, exactly as the vs-SFT
evaluation does (:mod:`cai.evaluate.requests`); identical responses are a tie without asking.
Win rate of arm A over arm B: ties count half, invalid answers are counted apart and never as
losses, with a 95% bootstrap interval over prompts (:func:`cai.evaluate.win_rate`). The reverse
direction is the same judgements seen from B (``1 - win rate`` up to invalids), so each
unordered pair is judged once.

The judgements of a pair are a content-addressed artifact (stage ``head_to_head``; key: the two
``evaluate`` artifact keys, the judge's key, the question, the tie rules and the template
version) built through :meth:`cai.artifacts.ArtifactStore.build` with a journal of answers
(:class:`cai.evaluate.baseline.JudgeSession`): a rerun reuses it, a killed compare resumes, and
API judges also hit the judge cache. The result, ``head_to_head.json`` in PATH, is what
``cai report`` reads (it never runs a model itself).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cai.data import Prompt, read_jsonl, write_jsonl
from cai.errors import CaiError, ConfigError, DataError
from cai.report.runs import H2H_FILE

log = logging.getLogger(__name__)

STAGE = "head_to_head"
STAGE_VERSION = "1"
JUDGEMENTS_FILE = "judgements.jsonl"
STATS_FIELDS = ("ties", "tie_margin", "bootstrap_resamples")  # must agree between the two runs


@dataclass(frozen=True)
class Side:
    """One arm of one seed: its run and what its ``evaluate`` artifact needs."""

    arm: str
    run: str  # the run's name in the report (its folder below PATH)
    info: dict[str, Any]  # run.json

    @property
    def eval_cfg(self) -> dict[str, Any]:
        return dict((self.info.get("config") or {}).get("eval") or {})

    def evaluation(self) -> str:
        """The key of the arm's headline evaluation (``eval.policy``'s ``evaluate_<policy>`` artifact)."""
        from cai.report.runs import headline_evaluation

        found = headline_evaluation(self.info)
        if found is None:
            raise DataError(f"run {self.run}: run.json has no evaluate_<policy> artifact (field 'artifacts')")
        return found[1]

    def artifact(self, stage: str) -> str:
        key = (self.info.get("artifacts") or {}).get(stage)
        if not key:
            raise DataError(f"run {self.run}: run.json has no {stage!r} artifact (field 'artifacts')")
        return str(key)


@dataclass(frozen=True)
class PairResult:
    """Arm A against arm B on one seed: a row of ``head_to_head.json``."""

    seed: Any
    arm_a: str
    arm_b: str
    run_a: str
    run_b: str
    artifact: str
    reused: bool
    win_rate: float  # A over B; NaN when no prompt decided it
    ci_low: float
    ci_high: float
    wins: int
    ties: int
    losses: int
    invalid: int
    n: int
    identical: int  # prompts whose two responses were identical (ties, not asked)


@dataclass
class CompareResult:
    """Everything ``cai compare`` found, judged and skipped."""

    rows: list[PairResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # runs/pairs not compared, with the reason

    def to_json(self) -> dict[str, Any]:
        return {"version": 1, "rows": [asdict(r) for r in self.rows], "skipped": list(self.skipped)}


# ----------------------------------------------------------------------------- inputs
def _samples(store: Any, side: Side) -> list[dict]:
    folder = store.path(side.evaluation())
    file = folder / "samples.jsonl"
    if not file.is_file():
        raise DataError(f"run {side.run}: its evaluate artifact has no {file} (moved or deleted from the "
                        "store?); rerun the sweep to rebuild it")
    rows = read_jsonl(file)
    for i, r in enumerate(rows, 1):
        for name in ("prompt_id", "arm_response"):
            if not isinstance(r.get(name), str):
                raise DataError(f"{file}:{i}: field {name!r} must be a string, got {r.get(name)!r}")
    return rows


def check_same_prompts(a: Side, b: Side, rows_a: list[dict], rows_b: list[dict]) -> None:
    """Both arms answered the same test prompts in the same order, else a DataError naming both runs."""
    ids_a, ids_b = [r["prompt_id"] for r in rows_a], [r["prompt_id"] for r in rows_b]
    if ids_a != ids_b:
        at = next((i for i, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y), min(len(ids_a), len(ids_b)))
        raise DataError(f"runs {a.run} and {b.run}: their evaluate samples cover {len(ids_a)} and {len(ids_b)} "
                        f"prompts and first differ at row {at + 1} (field 'prompt_id'); compare runs evaluated "
                        "on the same test prompts (same data and eval.max_prompts)")


def pair_settings(a: Side, b: Side) -> dict[str, Any]:
    """The judge (by its key), question and tie rules both runs evaluated with; must be equal."""
    from cai.judges.config import judge_key

    ea, eb = a.eval_cfg, b.eval_cfg
    if "judge" not in ea or "judge" not in eb:
        raise DataError(f"runs {a.run}, {b.run}: run.json config has no eval.judge")
    if judge_key(ea["judge"]) != judge_key(eb["judge"]):
        raise ConfigError(f"runs {a.run} and {b.run} were evaluated by different held-out judges "
                          f"({judge_key(ea['judge'])} vs {judge_key(eb['judge'])}, field eval.judge); a head-to-"
                          "head comparison needs one judge")
    for name in ("question", *STATS_FIELDS):
        if ea.get(name) != eb.get(name):
            raise ConfigError(f"runs {a.run} and {b.run}: eval.{name} differs ({ea.get(name)!r} vs "
                              f"{eb.get(name)!r}); compare runs evaluated with the same settings")
    if a.artifact("prompts") != b.artifact("prompts"):
        raise DataError(f"runs {a.run} and {b.run} use different prompts artifacts; compare runs of one sweep")
    return {"judge": judge_key(ea["judge"]), "question": ea.get("question"),
            **{k: ea[k] for k in STATS_FIELDS}}


# ----------------------------------------------------------------------------- judging one pair
def judge_pair(ctx: Any, a: Side, b: Side, rows_a: list[dict], rows_b: list[dict], prompts: Mapping[str, Prompt],
               settings: Mapping[str, Any], session: Mapping[str, Any]) -> dict:
    """The stage function of ``head_to_head``: judge A's response against B's on every prompt;
    ``session``: the :class:`~cai.evaluate.baseline.JudgeSession` arguments (:func:`_judge_session`)."""
    from cai.evaluate.baseline import JudgeSession
    from cai.evaluate.requests import (
        DEFAULT_COMPARISON_QUESTION,
        comparison_requests,
        judgements_from_results,
    )
    from cai.evaluate.winrates import Judgement, win_rate

    question = settings["question"] or DEFAULT_COMPARISON_QUESTION
    pairs = [(prompts[ra["prompt_id"]], ra["arm_response"], rb["arm_response"]) for ra, rb in zip(rows_a, rows_b)]
    same = {p.id for p, x, y in pairs if x.strip() == y.strip()}
    asks = [(f"cmp:{r.tag['order']}:{p.id}", r) for p, x, y in pairs if p.id not in same
            for r in comparison_requests(p, x, y, arm="a", baseline="b", question=question)]
    with JudgeSession(ctx, stage=STAGE, **session) as judge:
        with ctx.phase("judge"):
            results = judge.ask(asks)
        tokens_in, tokens_out, dollars = judge.cost()
    ctx.add_cost(tokens_in, tokens_out, dollars)
    judged = {j.prompt_id: j for j in judgements_from_results([r for _, r in asks], results).get(("a", "b"), [])}
    judgements = [Judgement(p.id, 0.5, 0.5) if p.id in same else judged[p.id] for p, _, _ in pairs]
    margin = float(settings["tie_margin"])
    write_jsonl(ctx.dir / JUDGEMENTS_FILE, [
        {"prompt_id": j.prompt_id, "a_response": x, "b_response": y, "p_first": j.p_first,
         "p_second": j.p_second, "outcome": j.outcome(margin), "failure": j.failure}
        for j, (_, x, y) in zip(judgements, pairs)])
    wr = win_rate(judgements, ties=settings["ties"], tie_margin=margin,
                  n_boot=int(settings["bootstrap_resamples"]), seed=int(a.info.get("seed") or 0))
    return {**wr.to_metrics("h2h"), "h2h/identical": len(same), "h2h/judge_cost_usd": dollars}


def _judge_session(side: Side, store_root: Path) -> tuple[dict[str, Any], dict[str, Path], Any]:
    """The :class:`~cai.evaluate.baseline.JudgeSession` arguments of run A's held-out judge (its
    whole ``eval.judge``, run-time fields included; ``model: tiny``: run A's tiny policy, then in
    the inputs), the inputs it needs, and the store."""
    from cai.artifacts import ArtifactStore
    from cai.judges.config import ready_judge, stage_judge

    ecfg = side.eval_cfg
    store = ArtifactStore(store_root)
    judge = ready_judge(ecfg["judge"], "eval.judge")
    inputs: dict[str, Path] = {}
    if judge.backend == "hf" and judge.model == "tiny":
        inputs["policy_model"] = store.path(side.artifact("policy_model"))
    session = {"judge": stage_judge(judge, inputs, "eval.judge"), "cache_path": store_root / "judge_cache.sqlite",
               "judge_batch": int(ecfg.get("judge_batch", 64)), "hf_batch_size": int(ecfg.get("hf_batch_size", 8))}
    return session, inputs, store


def compare_pair(a: Side, b: Side) -> PairResult:
    """Build (or reuse) the ``head_to_head`` artifact of A against B and read its win rate."""
    from cai.evaluate.baseline import eval_prompts
    from cai.evaluate.requests import EVAL_TEMPLATE_VERSION

    if a.info.get("store") != b.info.get("store"):
        raise DataError(f"runs {a.run} and {b.run} use different artifact stores ({a.info.get('store')} vs "
                        f"{b.info.get('store')}, field 'store' of run.json)")
    store_root = Path(str(a.info.get("store")))
    settings = pair_settings(a, b)
    session, inputs, store = _judge_session(a, store_root)
    rows_a, rows_b = _samples(store, a), _samples(store, b)
    check_same_prompts(a, b, rows_a, rows_b)
    prompts_all, _ = eval_prompts(store.path(a.artifact("prompts")), None)
    by_id = {p.id: p for p in prompts_all}
    missing = [r["prompt_id"] for r in rows_a if r["prompt_id"] not in by_id]
    if missing:
        raise DataError(f"run {a.run}: evaluate sample prompt {missing[0]!r} is not in the test split of its "
                        f"prompts artifact ({len(missing)} such prompt(s))")
    key_inputs = {"a": a.evaluation(), "b": b.evaluation(), "prompts": a.artifact("prompts")}
    if "policy_model" in inputs:
        key_inputs["policy_model"] = a.artifact("policy_model")
    config = {**settings, "template_version": EVAL_TEMPLATE_VERSION, "seed": a.info.get("seed")}
    key = store.key(STAGE, config, key_inputs, version=STAGE_VERSION)
    built = store.build(key, lambda ctx: judge_pair(ctx, a, b, rows_a, rows_b, by_id, settings, session),
                        meta={"seed": a.info.get("seed"), "arm_a": a.arm, "arm_b": b.arm})
    m = built.stage_info.get("metrics") or {}
    def num(k):
        return float(m[k]) if isinstance(m.get(k), (int, float)) else float("nan")
    return PairResult(a.info.get("seed"), a.arm, b.arm, a.run, b.run, key, built.reused,
                      num("h2h/win_rate"), num("h2h/win_rate_ci_low"), num("h2h/win_rate_ci_high"),
                      int(m.get("h2h/wins", 0)), int(m.get("h2h/ties", 0)), int(m.get("h2h/losses", 0)),
                      int(m.get("h2h/invalid", 0)), int(m.get("h2h/n", 0)), int(m.get("h2h/identical", 0)))


# ----------------------------------------------------------------------------- a folder of runs
def sides_by_seed(path: str | Path) -> tuple[dict[Any, list[Side]], list[str]]:
    """The runs under ``path`` with an ``evaluate`` artifact, grouped by seed (arm order kept),
    and the reasons others were left out."""
    from cai.report.runs import collect, headline_evaluation

    data = collect(path)
    groups: dict[Any, list[Side]] = {}
    skipped: list[str] = []
    for arm in data.arms:
        for r in arm.runs:
            if headline_evaluation(r.info) is None:
                skipped.append(f"run {r.name} ({arm.name}): no evaluate artifact")
                continue
            seed = r.seed
            if any(s.arm == arm.name for s in groups.get(seed, [])):
                skipped.append(f"run {r.name} ({arm.name}): a second run of this arm and seed {seed}; "
                               "the first is compared")
                continue
            groups.setdefault(seed, []).append(Side(arm.name, r.name, r.info))
    return groups, skipped


def compare(path: str | Path) -> tuple[CompareResult, Path]:
    """Compare every pair of arms of each seed under ``path``; write ``head_to_head.json`` there."""
    groups, skipped = sides_by_seed(path)
    result = CompareResult(skipped=skipped)
    for seed in sorted(groups, key=str):
        sides = groups[seed]
        if len(sides) < 2:
            result.skipped.append(f"seed {seed}: only one arm ({sides[0].arm}) has an evaluate artifact")
        for i, a in enumerate(sides):
            for b in sides[i + 1:]:
                row = compare_pair(a, b)
                log.info("head to head, seed %s: %s over %s: win rate %.3f [%.3f, %.3f] (%s)", seed, a.arm,
                         b.arm, row.win_rate, row.ci_low, row.ci_high, "reused" if row.reused else "built")
                result.rows.append(row)
    out = Path(path).expanduser().resolve() / H2H_FILE
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result.to_json(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(out)
    return result, out


def main(argv: list[str] | None = None) -> int:
    """``cai compare PATH``; returns the exit status (2 on a user mistake)."""
    p = argparse.ArgumentParser(prog="cai compare", description="Head-to-head win rates between the arms of a "
                                "sweep, judged by the runs' held-out judge; writes head_to_head.json in PATH.")
    p.add_argument("path", help="a sweep folder (or any folder of runs)")
    args = p.parse_args(argv)
    try:
        result, out = compare(args.path)
    except CaiError as e:
        print(f"cai: error: {e}", file=sys.stderr)
        return 2
    for r in result.rows:
        print(f"seed {r.seed}: {r.arm_a} over {r.arm_b}: {r.win_rate:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}] "
              f"(wins {r.wins}, ties {r.ties}, losses {r.losses}, invalid {r.invalid}, n {r.n})")
    for s in result.skipped:
        print(f"skipped: {s}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
