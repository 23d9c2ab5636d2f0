"""The top of a report: the answer per arm and policy, then the warnings that limit it.

- **Answer** (:func:`answer_section`): one row per arm and evaluated policy, the policy named in
  words from the run's config (:func:`policy_name`: "RLAIF · PPO", "RLHF · DPO", "SL-CAI"), with
  the headline metrics :data:`HEADLINE` (an explicit list of ``eval/<policy>/...`` names: win
  rate vs the baseline with its interval, length-controlled win rate, KL, length, harmless
  rate, held-out RM score, and the mean grade by a known rule ``eval.truth`` where a run has one,
  with a line on the baseline's grade and the share of replies at the rule's lowest grade), the
  labels its training used and the dollars the arm spent; a forest plot of the win rates with a
  line at 0.5 and a caption saying judge, prompts and seeds; and reward vs KL along each arm's
  PPO run.
- **Warnings** (:func:`warnings_section`): every check of :func:`find_warnings`, driven by the
  runs' metrics: the held-out judge is the labeller, a slot-biased or position-inconsistent
  labeller, label budgets or training steps that differ between matched arms, win-rate
  intervals that include 0.5, PPO monitor warnings, failed labels and invalid judgements.

A run written before each policy had its own evaluation (one ``evaluate`` artifact, metrics
``eval/...``) is read as ``eval/<eval.policy>/...`` by :mod:`cai.report.runs`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from cai.report.cells import arm_cell, fmt, stage_cost
from cai.report.render import PALETTE, Figure, Section, Table, forest_plot, xy_panels
from cai.report.runs import EVAL_ORDER, flatten

if TYPE_CHECKING:
    from cai.report.runs import Arm, ReportData, RunRecord

# the headline metrics, by exact name below eval/<policy>/ (column title, name)
HEADLINE = (("win rate vs baseline [95% CI]", "vs_sft/win_rate"), ("LC win rate", "vs_sft/lc_win_rate"),
            ("KL to baseline", "kl"), ("length (tokens)", "length"), ("harmless rate", "harmless/rate"),
            ("held-out RM score", "rm_score"), ("rule grade", "truth/mean"))
# columns shown only when some run has them (eval.truth: a synthetic task's known rule)
OPTIONAL_HEADLINE = frozenset({"truth/mean"})
# what a policy's training consumed: (labels used, optimizer steps) by policy
TRAINING = {"ppo": ("rm/data/used", "ppo/steps"), "dpo": ("dpo/data/used", "dpo/steps"),
            "sft": ("sft/examples", "sft/steps")}
REWARD_STEPS = "rm/steps"

# warning thresholds (the labeller's position metrics: cai.feedback.quality; one implementation)
SAME_SLOT_MAX = 0.25  # share of pairs whose *slot* wins in both orders; an unbiased labeller: ~0
POSITION_CONSISTENCY_MIN = 0.6  # share of pairs whose *response* wins in both orders
FIRST_SLOT_BAND = (0.35, 0.65)  # share of answers that prefer the first slot
FAILED_MAX = 0.0  # any failed label is named (they are left out of training)
INVALID_MAX = 0.05  # invalid held-out judgements above this share are named


# --------------------------------------------------------------------------- naming
def _cfg(run: RunRecord, path: str, default: Any = None) -> Any:
    return flatten(run.config).get(path, default)


def policy_name(run: RunRecord, policy: str) -> str:
    """The evaluated policy in words, from the run's config: "RLAIF · PPO", "RLHF · DPO", "SL-CAI"..."""
    def source(labels_from: Any) -> str:
        return {"ai": "RLAIF", "human": "RLHF"}.get(str(labels_from), str(labels_from))

    if policy == "ppo":
        if _cfg(run, "ppo.reward_from") == "judge":
            return "d-RLAIF · PPO"
        return f"{source(_cfg(run, 'reward.labels_from'))} · PPO"
    if policy == "dpo":
        return f"{source(_cfg(run, 'dpo.labels_from'))} · DPO"
    if policy == "sft":
        return "SFT on judge answers" if _cfg(run, "sft.source") == "judge_answers" else "SL-CAI"
    if policy == "initial":
        return "initial policy"
    return policy


def baseline_name(run: RunRecord) -> str:
    base = _cfg(run, "eval.baseline", "initial")
    return f"the {policy_name(run, 'sft')} policy" if base == "sft" else "the initial policy"


def judge_name(run: RunRecord) -> str:
    backend, model = _cfg(run, "eval.judge.backend", "?"), _cfg(run, "eval.judge.model", "?")
    return "the tiny local model" if backend == "hf" and model == "tiny" else f"{model} ({backend})"


def evaluated(arm: Arm) -> list[str]:
    """The policies some run of the arm has evaluation metrics for, in the order initial, sft, dpo, ppo."""
    keys = {k for r in arm.runs for k in r.metrics}
    return [p for p in EVAL_ORDER if f"eval/{p}/vs_sft/win_rate" in keys]


def row_label(data: ReportData, arm: Arm, policy: str) -> str:
    words = policy_name(arm.runs[0], policy)
    return words if len(data.arms) == 1 else f"{arm.name}: {words}"


def arm_colours(data: ReportData) -> dict[str, str]:
    return {a.name: PALETTE[i % len(PALETTE)] for i, a in enumerate(data.arms)}


def _dollars(arm: Arm) -> float:
    per_run = [sum(stage_cost(st)[2] for st in r.stages.values()) for r in arm.runs]
    return sum(per_run) / len(per_run) if per_run else math.nan


# --------------------------------------------------------------------------- the answer
def _num(v: float) -> str:
    return "—" if not math.isfinite(v) else (str(int(v)) if float(v).is_integer() and abs(v) < 1e6 else f"{v:.3g}")


def _short(cell: Any) -> str:
    """A headline cell: 3 significant digits and the interval (the seeds are in the paragraph)."""
    if cell is None:
        return "—"
    s = _num(cell.value)
    if math.isfinite(cell.low) and math.isfinite(cell.high) and cell.low != cell.high:
        s += f" [{_num(cell.low)}, {_num(cell.high)}]"
    return s


def answer_section(data: ReportData) -> Section:
    s = Section("Answer", figure_row=True)
    rows, forest, colours = [], [], []
    colour_of = arm_colours(data)
    keys = {k for r in data.runs for k in r.metrics}
    columns = [(title, name) for title, name in HEADLINE if name not in OPTIONAL_HEADLINE
               or any(k.startswith("eval/") and k.endswith("/" + name) for k in keys)]
    for arm in data.arms:
        for policy in evaluated(arm):
            cells = [_short(arm_cell(arm, f"eval/{policy}/{name}")) for _, name in columns]
            labels, steps = TRAINING.get(policy, (None, None))
            used = arm_cell(arm, labels) if labels else None
            n_steps = arm_cell(arm, steps) if steps else None
            if policy == "ppo" and _cfg(arm.runs[0], "ppo.reward_from") == "judge":
                used = None  # d-RLAIF asks the judge online: no labelled pairs
            rows.append([arm.name if len(data.arms) > 1 else "—", policy_name(arm.runs[0], policy), *cells,
                         (fmt(used.value) if used else "—") + (f" ({fmt(n_steps.value)} steps)" if n_steps else ""),
                         f"${_dollars(arm):.4f}"])
            wr = arm_cell(arm, f"eval/{policy}/vs_sft/win_rate")
            if wr:
                forest.append((row_label(data, arm, policy), wr.bar()))
                colours.append(colour_of[arm.name])
    if not rows:
        s.notes.append("No evaluation yet: no metric eval/<policy>/vs_sft/win_rate in these runs (stage evaluate "
                       "writes them; add it to experiment.stages).")
        return s
    run = data.runs[0]
    seeds = sorted({str(r.seed) for r in data.runs})
    n = sorted({int(v) for r in data.runs for k, v in r.metrics.items()
                if k.startswith("eval/") and k.endswith("/vs_sft/n") and math.isfinite(v)})
    s.tables.append(Table(["arm", "policy", *[t for t, _ in columns], "labels used", "$ per run"], rows))
    per_arm = sorted({len(a.runs) for a in data.arms})
    s.paragraphs.append(
        f"Each policy against {baseline_name(run)} on the same held-out test prompts, judged by "
        f"{judge_name(run)} (eval.judge) in both orders. Value [95% interval]: "
        + ("the bootstrap over prompts (one seed). " if per_arm == [1] else
           f"the mean over {'/'.join(map(str, per_arm))} seeds with a Student-t interval. ")
        + "Labels used: the labelled pairs the policy's training read (the reward model's, for PPO; SL-CAI: its "
        "revised examples) and its optimizer steps; $: the arm's judge spend per run.")
    caption = (f"Win rate vs {baseline_name(run)} per arm and policy, 95% intervals; dashed line: parity (0.5). "
               f"Judge: {judge_name(run)}; n = {', '.join(map(str, n)) or '?'} prompts; "
               f"seed{'s' if len(seeds) > 1 else ''} {', '.join(seeds)}.")
    s.figures.append(Figure("forest_win_rate", forest_plot(forest, colours=colours, xlabel="win rate vs baseline"),
                            caption))
    reward_kl = _reward_vs_kl(data)
    if reward_kl:
        s.figures.append(reward_kl)
    else:
        s.notes.append("No reward-vs-KL plot: no arm trained PPO (its train log holds ppo/objective/kl and "
                       "ppo/objective/scores).")
    s.paragraphs += _truth_lines(data)
    s.paragraphs += _feedback_lines(data)
    s.details.append(_win_rate_counts(data))
    return s


# What the feedback itself got right, before any policy trained on it: the labels against a known
# rule (labels.truth) or against human labels, and the reward model on its held-out pairs.
FEEDBACK = (("labels agree with the known rule", "label/truth_agreement"),
            ("labels agree with humans", "quality/agreement"),
            ("reward model's held-out accuracy", "rm/eval/accuracy"),
            ("held-out reward model's accuracy", "eval_rm/eval/accuracy"))


def _feedback_lines(data: ReportData) -> list[str]:
    """One line per arm: how good its labels and reward model are, where measured."""
    lines = []
    for arm in data.arms:
        parts = [f"{what} {cell.text()}" for what, key in FEEDBACK if (cell := arm_cell(arm, key))]
        if parts:
            lines.append(f"Feedback{f' ({arm.name})' if len(data.arms) > 1 else ''}: " + "; ".join(parts) + ".")
    return lines


def _truth_lines(data: ReportData) -> list[str]:
    """One line per arm evaluated with a known rule (``eval.truth``): the baseline's mean grade, and
    the share of replies at the rule's lowest grade for the baseline and each evaluated policy."""
    lines = []
    for arm in data.arms:
        rule = _cfg(arm.runs[0], "eval.truth")
        base = arm_cell(arm, "eval/baseline/truth/mean")
        rates = [(words, cell) for words, key in
                 [("baseline", "eval/baseline/truth/lowest_rate")]
                 + [(policy_name(arm.runs[0], p), f"eval/{p}/truth/lowest_rate") for p in evaluated(arm)]
                 if (cell := arm_cell(arm, key))]
        if not rule or not (base or rates):
            continue
        text = (f"Rule grade{f' ({arm.name})' if len(data.arms) > 1 else ''}: the replies graded by the known "
                f"rule {rule} (eval.truth), mean [95% interval]")
        if base:
            text += f"; {baseline_name(arm.runs[0])} (baseline) {_short(base)}"
        if rates:
            lowest = _cfg(arm.runs[0], "eval.truth_lowest", 0.0)
            text += (f". Share of replies at its lowest grade ({_num(float(lowest))} or below): "
                     + "; ".join(f"{words} {_short(cell)}" for words, cell in rates))
        lines.append(text + ".")
    return lines


KL_X, SCORE_Y = "ppo/objective/kl", "ppo/objective/scores"


def _reward_vs_kl(data: ReportData) -> Figure | None:
    """Per arm, its PPO run's mean reward-model score against its KL at each logged step."""
    panels: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    colours: dict[str, str] = {}
    colour_of = arm_colours(data)
    for arm in data.arms:
        for r in arm.runs:
            rows = [row for row in r.train_logs.get("ppo", [])
                    if isinstance(row.get(KL_X), (int, float)) and isinstance(row.get(SCORE_Y), (int, float))]
            if rows:
                name = arm.name if len(arm.runs) == 1 else f"seed {r.seed}"
                panels.setdefault(f"{arm.name}: {policy_name(r, 'ppo')}", {})[name] = (
                    [float(x[KL_X]) for x in rows], [float(x[SCORE_Y]) for x in rows])
                seeds = [str(x.seed) for x in arm.runs]
                colours[name] = colour_of[arm.name] if len(arm.runs) == 1 else \
                    PALETTE[seeds.index(str(r.seed)) % len(PALETTE)]
    if not panels:
        return None
    png = xy_panels(panels, xlabel="KL to reference (ppo/objective/kl)", ylabel="RM score (ppo/objective/scores)",
                    colours=colours)
    return Figure("reward_vs_kl", png, "Reward vs KL along each arm's PPO run (one point per logged step; hollow: "
                  "first step, filled: last): the reward model's score the policy bought with its KL budget.")


def _win_rate_counts(data: ReportData) -> Table:
    rows = []
    for arm in data.arms:
        for policy in evaluated(arm):
            for what in ("win_rate", "lc_win_rate"):
                cells = [arm_cell(arm, f"eval/{policy}/vs_sft/{c}") for c in ("wins", "ties", "losses", "invalid")]
                wr = arm_cell(arm, f"eval/{policy}/vs_sft/{what}")
                rows.append([row_label(data, arm, policy), f"eval/{policy}/vs_sft/{what}", wr.text() if wr else "—"]
                            + [fmt(c.value) if c else "—" for c in cells])
    return Table(["policy", "metric", "value [95% CI]", "wins", "ties", "losses", "invalid"], rows,
                 caption="Win rates with their counts (ties count half; invalid judgements are apart, never losses)")


# --------------------------------------------------------------------------- warnings
def _values(arm: Arm, key: str) -> list[float]:
    return [r.metrics[key] for r in arm.runs if key in r.metrics and math.isfinite(r.metrics[key])]


def _fmt_list(values: list[float]) -> str:
    return fmt(values[0]) if len(set(values)) == 1 else "/".join(fmt(v) for v in values)


def uses_ai_labels(arm: Arm) -> bool:
    """Whether the arm trains on the AI labeller's output (reward model, DPO) or asks it online (d-RLAIF)."""
    r = arm.runs[0]
    return "ai" in (_cfg(r, "reward.labels_from"), _cfg(r, "dpo.labels_from")) or _cfg(r, "ppo.reward_from") == "judge"


def _arm_warnings(data: ReportData, arm: Arm) -> list[str]:
    """The warnings of one arm, each a sentence with ``{where}`` where the arms it holds for go."""
    out: list[str] = []
    labeller = [p for p in evaluated(arm) if 1.0 in _values(arm, f"eval/{p}/judge_is_labeller")]
    if labeller:
        out.append("The held-out judge is the labeller{where}: eval/<policy>/judge_is_labeller = 1, so the win "
                   "rates are not an independent evaluation (set eval.judge to another model).")
    if uses_ai_labels(arm):  # the labeller's position bias and failures matter where its labels are used
        same = _values(arm, "label/same_slot_rate")
        if same and max(same) > SAME_SLOT_MAX:
            out.append(f"The AI labeller is slot-biased{{where}}: label/same_slot_rate = {_fmt_list(same)} "
                       f"(share of pairs where the same slot wins in both orders; above {SAME_SLOT_MAX}).")
        cons = _values(arm, "label/position_consistency")
        if cons and min(cons) < POSITION_CONSISTENCY_MIN:
            out.append(f"The AI labeller's position consistency is low{{where}}: label/position_consistency = "
                       f"{_fmt_list(cons)} (below {POSITION_CONSISTENCY_MIN}).")
        first = _values(arm, "label/first_slot_rate")
        if first and any(not FIRST_SLOT_BAND[0] <= v <= FIRST_SLOT_BAND[1] for v in first):
            out.append(f"The AI labeller prefers one slot{{where}}: label/first_slot_rate = {_fmt_list(first)} "
                       f"(outside {FIRST_SLOT_BAND[0]}–{FIRST_SLOT_BAND[1]}).")
        failed, pairs = _values(arm, "label/failed"), _values(arm, "label/pairs")
        if failed and pairs and max(failed) > FAILED_MAX:
            share = max(f / p for f, p in zip(failed, pairs) if p)
            out.append(f"{share:.1%} of the AI labels failed{{where}} (label/failed = {_fmt_list(failed)} of "
                       f"{_fmt_list(pairs)} pairs); failed labels are left out of training.")
    for p in evaluated(arm):
        inv, n = _values(arm, f"eval/{p}/vs_sft/invalid"), _values(arm, f"eval/{p}/vs_sft/n")
        if inv and n and max(i / m for i, m in zip(inv, n) if m) > INVALID_MAX:
            out.append(f"{row_label(data, arm, p)}: {_fmt_list(inv)} of {_fmt_list(n)} held-out judgements are "
                       f"invalid (eval/{p}/vs_sft/invalid); the win rate counts only the others.")
    ppo_warn = _values(arm, "ppo/warnings")
    if ppo_warn and max(ppo_warn) > 0:
        out.append(f"PPO's monitors warned{{where}}: ppo/warnings = {_fmt_list(ppo_warn)} (negative KL, KL over "
                   "budget, length drift, repetition or reward hacking; the run's cai.log says which).")
    for p in evaluated(arm):
        wr = arm_cell(arm, f"eval/{p}/vs_sft/win_rate")
        if wr and math.isfinite(wr.low) and math.isfinite(wr.high) and wr.low <= 0.5 <= wr.high:
            out.append(f"{row_label(data, arm, p)}: win rate {_short(wr)} includes 0.5: no detectable "
                       "difference from the baseline at this sample size.")
    return out


def find_warnings(data: ReportData) -> list[str]:
    """Every finding that limits the conclusion, one sentence each naming the arms, metric and value;
    a finding that holds in several arms is said once, naming them."""
    found: dict[str, list[str]] = {}
    for arm in data.arms:
        for text in _arm_warnings(data, arm):
            found.setdefault(text, []).append(arm.name)
    out = []
    for text, arms in found.items():
        if len(data.arms) == 1:
            where = ""
        elif len(arms) == len(data.arms):
            where = " (all arms)"
        else:
            where = f" (arm{'s' if len(arms) > 1 else ''} {', '.join(arms)})"
        out.append(text.replace("{where}", where))
    # budgets and steps that differ between matched arms
    if len(data.arms) > 1:
        for key, what in (("rm/data/used", "reward-model labels"), (REWARD_STEPS, "reward-model steps"),
                          ("dpo/data/used", "DPO labels"), ("dpo/steps", "DPO steps"), ("ppo/steps", "PPO steps")):
            per_arm = {a.name: c.value for a in data.arms if (c := arm_cell(a, key))}
            if len(per_arm) > 1 and len(set(per_arm.values())) > 1:
                out.append(f"Unequal {what} between matched arms ({key}): "
                           + ", ".join(f"{a} {fmt(v)}" for a, v in per_arm.items())
                           + "; the comparison confounds label source with budget.")
    return out


def warnings_section(data: ReportData) -> Section:
    s = Section("Warnings")
    s.warnings = find_warnings(data)
    if not s.warnings:
        s.paragraphs.append(
            "None found. Checked: held-out judge ≠ labeller, the labeller's same-slot rate (≤ "
            f"{SAME_SLOT_MAX}), position consistency (≥ {POSITION_CONSISTENCY_MIN}) and first-slot rate, failed "
            "labels, invalid judgements, PPO monitor warnings, win-rate intervals against 0.5, and label budgets "
            "and steps between arms.")
    return s
