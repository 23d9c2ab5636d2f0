"""The sections of a ``cai report``: what each one shows, computed from the runs' records.

Each builder takes the :class:`cai.report.ReportData` of the runs and returns one
:class:`cai.report.render.Section`. A section without data gets a one-line note saying which
records it looked for, never a made-up table. Conventions the builders rely on:

- a metric ``X`` with siblings ``X_ci_low`` / ``X_ci_high`` has that interval (the
  evaluation and label-quality stages write them);
- win rates are metrics ending in ``win_rate`` (``eval/vs_sft/win_rate``,
  ``eval/vs_sft/lc_win_rate``) with counts ``<prefix>/wins|ties|losses|invalid``
  (:meth:`cai.evaluate.WinRate.to_metrics`);
- agreement per principle is ``quality/principle/<id>/agreement`` (+ ``/n``), as written by
  the label-quality stage;
- cost and build time come from each ``stages/<stage>.json`` (``cost``, ``wall_time_s``,
  ``reused``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from cai.report.artifacts import artifacts_section
from cai.report.cells import CI_SUFFIXES, Cell, arm_cell, fmt, stage_cost
from cai.report.h2h import head_to_head_section, paired_tests_section
from cai.report.headline import answer_section, warnings_section
from cai.report.render import Figure, Section, Table, bar_chart, line_panels
from cai.report.reward_eval import CAPTION as REWARD_SETS_CAPTION
from cai.report.reward_eval import HEADER as REWARD_SETS_HEADER
from cai.report.reward_eval import reward_set_cells

if TYPE_CHECKING:
    from cai.report.runs import Arm, ReportData, RunRecord

COUNT_NAMES = ("n", "wins", "ties", "losses", "invalid")  # shown in their own tables, not as headlines
PRINCIPLE = re.compile(r"^quality/principle/(.+)/agreement$")
# training curves by exact metric name: (panel title, stage whose train_log.jsonl has it, metric)
CURVES = (
    ("PPO: KL to reference", "ppo", "ppo/objective/kl"),
    ("PPO: reward-model score", "ppo", "ppo/objective/scores"),
    ("PPO: response length (tokens)", "ppo", "ppo/response_length"),
    ("Reward model: loss", "reward", "rm/loss"),
    ("Reward model: accuracy", "reward", "rm/accuracy"),
    ("DPO: loss", "dpo", "dpo/loss"),
    ("DPO: reward margin", "dpo", "dpo/rewards/margins"),
    ("DPO: reward accuracy", "dpo", "dpo/rewards/accuracies"),
    ("SFT: loss", "sft", "sft/loss"),
    ("Held-out RM (eval_reward): loss", "eval_reward", "rm/loss"),
)
# the label-quality table, by exact name (the labeller's position metrics and agreement with humans)
LABEL_QUALITY = ("label/pairs", "label/failed", "label/position_consistency", "label/same_slot_rate",
                 "label/first_slot_rate", "label/mean_p_a", "quality/agreement", "quality/ece")


def _run_cell(run: RunRecord, key: str) -> str:
    if key not in run.metrics:
        return "—"
    low, high = (run.metrics.get(key + s, math.nan) for s in CI_SUFFIXES)
    return Cell(run.metrics[key], low, high).text()


def _cell_text(arm: Arm, key: str) -> str:
    c = arm_cell(arm, key)
    return c.text() if c else "—"


def metric_keys(data: ReportData) -> list[str]:
    keys = {k for r in data.runs for k in r.metrics}
    return sorted(k for k in keys if not k.endswith(CI_SUFFIXES))


def run_label(data: ReportData, run: RunRecord) -> str:
    """A short, unique name for a run in legends and columns: its arm and seed."""
    labels: dict[int, str] = {}
    for arm in data.arms:
        for r in arm.runs:
            if len(data.arms) == 1:
                labels[id(r)] = f"seed {r.seed}" if len(data.runs) > 1 else r.name
            else:
                labels[id(r)] = f"{arm.name} · seed {r.seed}" if len(arm.runs) > 1 else arm.name
    if len(set(labels.values())) < len(labels):  # e.g. one seed run twice: fall back to folders
        return run.name
    return labels[id(run)]


# --------------------------------------------------------------------------- sections
def runs_section(data: ReportData) -> Section:
    rows = []
    for arm in data.arms:
        for r in arm.runs:
            reused = sum(bool(s.get("reused")) for s in r.stages.values())
            rows.append([r.name, arm.name, str(r.info.get("experiment", "")), str(r.seed),
                         " ".join(r.overrides) or "—", str(len(r.stages) - reused), str(reused)])
    table = Table(["run", "arm", "experiment", "seed", "overrides", "stages built", "stages reused"], rows)
    return Section("Runs", tables=[table])


def all_metrics_section(data: ReportData) -> Section:
    keys = metric_keys(data)
    s = Section("All metrics", paragraphs=[
        "Every metric of every run, as metrics.json has it (value [its stage's 95% interval]), folded."])
    if not keys:
        s.notes.append("No metrics: no metrics.json in these runs.")
        return s
    runs = [r for a in data.arms for r in a.runs]
    s.details.append(Table(["metric"] + [run_label(data, r) for r in runs],
                           [[k] + [_run_cell(r, k) for r in runs] for k in keys],
                           caption=f"All {len(keys)} metrics, per run"))
    return s


Panels = dict[str, dict[str, list[tuple[list[float], list[float]]]]]


def curve_panels(data: ReportData) -> tuple[Panels, dict[str, str]]:
    """Panel title -> series name -> one ``(steps, values)`` per seed, for each quantity of
    :data:`CURVES` some run logged; and each series' colour (its arm's). An artifact shared by
    several arms (the SFT policy, the held-out RM) is one series named after all of them."""
    from cai.report.headline import arm_colours

    colour_of = arm_colours(data)
    panels: Panels = {}
    colours: dict[str, str] = {}
    for title, stage, metric in CURVES:
        drawn: dict[str, str] = {}  # artifact key -> its series
        series: dict[str, list[tuple[list[float], list[float]]]] = {}
        for arm in data.arms:
            for r in arm.runs:
                key = str((r.info.get("artifacts") or {}).get(stage))
                log_rows = r.train_logs.get(stage, [])
                pts = [(float(row.get("step", i)), float(row[metric])) for i, row in enumerate(log_rows)
                       if isinstance(row.get(metric), (int, float)) and not isinstance(row.get(metric), bool)]
                if not pts:
                    continue
                if key in drawn:  # the same artifact: name this arm too, never a second line
                    old = drawn[key]
                    if arm.name not in old.split(" + "):
                        new = f"{old} + {arm.name}"
                        series[new] = series.pop(old)
                        colours[new] = colours.get(old, colour_of[arm.name])
                        drawn = {k: (new if v == old else v) for k, v in drawn.items()}
                    continue
                name = arm.name
                drawn[key] = name
                series.setdefault(name, []).append(([p[0] for p in pts], [p[1] for p in pts]))
                colours.setdefault(name, colour_of[arm.name])
        if series:
            panels[f"{title}  ({metric})"] = series
    return panels, colours


def curves_section(data: ReportData) -> Section:
    """One panel per quantity of :data:`CURVES`; arms overlaid; an arm's seeds as a band; an artifact
    shared by several arms drawn once (:func:`curve_panels`)."""
    s = Section("Training curves")
    panels, colours = curve_panels(data)
    if panels:
        names = ", ".join(dict.fromkeys(m for _, _, m in CURVES if any(k.endswith(f"({m})") for k in panels)))
        s.figures.append(Figure("training_curves", line_panels(panels, colours=colours),
                                f"Training curves by step: {names}. Arms overlaid; several seeds: their mean with "
                                "the band from lowest to highest; one artifact shared by arms is drawn once."))
        missing = [f"{m} ({st})" for _, st, m in CURVES
                   if any(st in r.train_logs for r in data.runs) and not any(k.endswith(f"({m})") for k in panels)]
        if missing:
            s.notes.append(f"Not in the train logs, so not drawn: {', '.join(missing)}.")
    unreadable = sorted({f"{r.name} ({', '.join(r.unreadable_logs)})" for r in data.runs if r.unreadable_logs})
    if unreadable:
        s.notes.append("Artifacts not found in the store (moved or deleted), so their train logs are not "
                       f"shown: {'; '.join(unreadable)}.")
    if not panels:
        s.notes.append("No training curves: no artifact of these runs has a train_log.jsonl with "
                       f"{', '.join(dict.fromkeys(m for _, _, m in CURVES))} (training stages write one).")
    return s


def label_quality_section(data: ReportData) -> Section:
    found = sorted({m.group(1) for k in metric_keys(data) if (m := PRINCIPLE.match(k))})
    s = Section("Label quality")
    keys = [k for k in LABEL_QUALITY if any(k in r.metrics for r in data.runs)]
    if keys:
        s.tables.append(Table(["metric"] + [a.name for a in data.arms],
                              [[k] + [_cell_text(a, k) for a in data.arms] for k in keys],
                              caption="The AI labeller: pairs, failures, position metrics (position_consistency: "
                                      "the same response wins in both orders; same_slot_rate: the same slot does), "
                                      "agreement with human labels where measured"))
    else:
        s.notes.append("No AI labels in these runs (no label/* metric).")
    if not found:
        s.notes.append("No per-principle agreement: no 'quality/principle/<id>/agreement' metric "
                       "(the label_quality stage writes it).")
        return s
    rows = []
    for pid in found:
        key = f"quality/principle/{pid}/agreement"
        cells = []
        for a in data.arms:
            n = arm_cell(a, f"quality/principle/{pid}/n")
            cells.append(_cell_text(a, key) + (f" (n={fmt(n.value)})" if n else ""))
        rows.append([pid] + cells)
    s.tables.append(Table(["principle"] + [a.name for a in data.arms], rows,
                          caption="Share of pairs where the AI judge preferred the human-chosen response"))
    series = {a.name: [c.bar() if (c := arm_cell(a, f"quality/principle/{p}/agreement")) else None
                       for p in found] for a in data.arms}
    s.figures.append(Figure("principle_agreement",
                            bar_chart(found, series, ylabel="agreement with humans", reference=0.5,
                                      ylim=(0.0, 1.0)),
                            "Agreement with human labels per principle; dashed line: chance"))
    return s


def reward_sets_section(data: ReportData) -> Section:
    """Reward models (and DPO's implicit reward) on the pair files of ``reward.eval_sets``: one
    RewardBench-style row per run, set and model."""
    s = Section("Reward models on pair files")
    rows = [[run_label(data, run), *cells] for run in data.runs for cells in reward_set_cells(run.metrics)]
    if rows:
        s.tables.append(Table(["run", *REWARD_SETS_HEADER], rows, caption=REWARD_SETS_CAPTION))
    else:
        s.notes.append("No reward model scored on pair files (set reward.eval_sets, or run "
                       "`cai score RUN --pairs FILE`).")
    return s


def cost_section(data: ReportData) -> Section:
    s = Section("Cost", paragraphs=[
        "Tokens and dollars of model calls, from each stage's stage.json. 'Used' counts every "
        "artifact a run read (built earlier or by it); 'paid' only what the runs built themselves."])
    if not any(r.stages for r in data.runs):
        s.notes.append("No cost records: no stages/*.json in these runs.")
        return s
    rows, detail = [], []
    for arm in data.arms:
        used = [sum(stage_cost(st)[2] for st in r.stages.values()) for r in arm.runs]
        paid = [stage_cost(st) for r in arm.runs for st in r.stages.values() if not st.get("reused")]
        tokens = [sum(stage_cost(st)[i] for r in arm.runs for st in r.stages.values()) for i in (0, 1)]
        rows.append([arm.name, str(len(arm.runs)), fmt(tokens[0]), fmt(tokens[1]),
                     f"${sum(used) / len(used):.4f}", f"${sum(p[2] for p in paid):.4f}",
                     f"{sum(p[3] for p in paid):.1f}"])
        for r in arm.runs:
            for name, st in r.stages.items():
                ti, to, dollars, wall = stage_cost(st)
                detail.append([r.name, name, "reused" if st.get("reused") else "built", fmt(ti), fmt(to),
                               f"${dollars:.4f}", f"{wall:.2f}"])
    s.tables.append(Table(["arm", "runs", "tokens in", "tokens out", "$ used per run", "$ paid",
                           "build time paid (s)"], rows))
    s.details.append(Table(["run", "stage", "artifact", "tokens in", "tokens out", "$", "wall time (s)"],
                           detail, caption="Per stage and run"))
    return s


def _describe_constitution(path: str) -> tuple[str, str, str]:
    """(name, version, current file hash) of a configured constitution, or why it is unknown."""
    from cai.constitution import load_constitution, resolve_constitution

    try:
        c = load_constitution(resolve_constitution(path))
    except Exception as e:  # a report describes; a missing or broken file is a finding, not a crash
        return "?", "?", f"cannot read: {str(e).splitlines()[0][:120]}"
    return c.name, c.version, c.hash


def constitution_section(data: ReportData) -> Section:
    s = Section("Constitution")
    combos: dict[tuple[str, str | None], list[str]] = {}
    for r in data.runs:
        path = str((r.config.get("constitution") or {}).get("path", "?"))
        combos.setdefault((path, r.info.get("constitution_hash")), []).append(r.name)
    rows = []
    for (path, recorded), names in combos.items():
        name, version, now = _describe_constitution(path)
        if recorded is None:
            status = "not used by any stage of these runs"
        else:
            status = "file unchanged" if now == recorded else "file changed since the run"
        rows.append([path, name, version, (recorded or "—")[:16], now[:16] if len(now) == 64 else now,
                     status, ", ".join(names)])
    s.tables.append(Table(["configured", "name", "version", "hash used", "hash of file now", "status",
                           "runs"], rows))
    if all(h is None for _, h in combos):
        s.notes.append("No stage of these runs used the constitution, so no hash was recorded.")
    return s


def config_section(data: ReportData) -> Section:
    from cai.report.runs import flatten, format_value

    s = Section("Config differences")
    if len(data.runs) == 1:
        s.notes.append("One run: there is no other run to compare its config with.")
        return s
    if not data.varying:
        s.paragraphs.append("All runs have identical resolved configs.")
        return s
    flats = [flatten(r.config) for r in data.runs]
    rows = [[k] + [format_value(f[k]) if k in f else "(absent)" for f in flats]
            for k in data.varying]
    s.paragraphs.append(f"{len(data.varying)} config value(s) differ between runs (from each run.json). "
                        "Arms group runs that differ only in seed and store location.")
    s.tables.append(Table(["config key"] + [r.name for r in data.runs], rows))
    return s


SECTION_BUILDERS: tuple[Callable[[ReportData], Section], ...] = (
    answer_section, warnings_section, head_to_head_section, paired_tests_section, label_quality_section,
    reward_sets_section, curves_section, cost_section, constitution_section, config_section, artifacts_section,
    runs_section, all_metrics_section,
)
