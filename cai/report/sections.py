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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cai.report.artifacts import artifacts_section
from cai.report.h2h import head_to_head_section, paired_tests_section
from cai.report.render import Bar, Figure, Section, Table, bar_chart, line_panels
from cai.stats import seed_summary

if TYPE_CHECKING:
    from cai.report.runs import Arm, ReportData, RunRecord

HIDDEN_PREFIXES = ("pipeline/", "time/")
HEADLINE_PREFIXES = ("eval/", "rm/", "reward/", "dpo/", "ppo/", "sft/", "quality/", "label/")
CI_SUFFIXES = ("_ci_low", "_ci_high")
COUNT_NAMES = ("n", "wins", "ties", "losses", "invalid")  # shown in their own tables, not as headlines
WIN_RATE = re.compile(r"(^|/)(lc_)?win_rate$")
PRINCIPLE = re.compile(r"^quality/principle/(.+)/agreement$")
CURVE_GROUPS = (("reward", ("reward", "score")), ("KL", ("kl",)), ("length", ("len",)), ("loss", ("loss",)))
MAX_PANELS = 6


# --------------------------------------------------------------------------- cells
def fmt(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if float(v).is_integer() and abs(v) < 1e12:
        return str(int(v))
    return f"{v:.4g}"


@dataclass(frozen=True)
class Cell:
    """An arm's value of one metric: a run's value with its stage's interval, or a seed mean."""

    value: float
    low: float = math.nan
    high: float = math.nan
    seeds: int = 1

    def text(self) -> str:
        s = fmt(self.value)
        if math.isfinite(self.low) and math.isfinite(self.high) and self.low != self.high:
            s += f" [{fmt(self.low)}, {fmt(self.high)}]"
        return s + (f" ({self.seeds} seeds)" if self.seeds > 1 else "")

    def bar(self) -> Bar:
        return Bar(self.value, self.low, self.high)


def arm_cell(arm: Arm, key: str) -> Cell | None:
    values = [r.metrics[key] for r in arm.runs if key in r.metrics and math.isfinite(r.metrics[key])]
    if not values:
        return None
    if len(values) == 1:
        run = next(r for r in arm.runs if key in r.metrics and math.isfinite(r.metrics[key]))
        low, high = (run.metrics.get(key + s, math.nan) for s in CI_SUFFIXES)
        return Cell(values[0], low, high)
    s = seed_summary(values)
    return Cell(s.mean, s.ci_low, s.ci_high, s.n)


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


def arms_section(data: ReportData) -> Section:
    keys = metric_keys(data)
    headline = [k for k in keys if k.startswith(HEADLINE_PREFIXES) and "/principle/" not in k
                and k.rsplit("/", 1)[-1].split("_")[0] not in COUNT_NAMES]
    cols = ["metric"] + [a.name for a in data.arms]
    s = Section("Arms", paragraphs=[
        "Value [95% interval]. One run: the interval its stage computed (bootstrap over prompts or "
        "pairs). Several seeds: the mean over seeds with a Student-t interval (with 2 seeds its factor "
        "is 12.7, so such intervals are wide and may leave the metric's range: run more seeds)."])
    if headline:
        s.tables.append(Table(cols, [[k] + [_cell_text(a, k) for a in data.arms] for k in headline]))
    else:
        s.notes.append("No evaluation, reward-model, training or label metrics in these runs yet "
                       "(only data/sampling stages ran); every metric is listed below.")
    runs = [r for a in data.arms for r in a.runs]
    s.details.append(Table(["metric"] + [run_label(data, r) for r in runs],
                           [[k] + [_run_cell(r, k) for r in runs] for k in keys],
                           caption=f"All {len(keys)} metrics, per run"))
    return s


def win_rates_section(data: ReportData) -> Section:
    keys = [k for k in metric_keys(data) if WIN_RATE.search(k)]
    s = Section("Win rates")
    if not keys:
        s.notes.append("No win rates yet: no metric ending in 'win_rate' in these runs (the evaluation "
                       "stage writes them).")
        return s
    series = {a.name: [c.bar() if (c := arm_cell(a, k)) else None for k in keys] for a in data.arms}
    png = bar_chart(keys, series, ylabel="win rate", reference=0.5, ylim=(0.0, 1.0))
    s.figures.append(Figure("win_rates", png, "Win rates with 95% intervals; dashed line: parity (0.5)"))
    rows = []
    for k in keys:
        prefix = k.rsplit("/", 1)[0] if "/" in k else ""
        counts = ("wins", "ties", "losses", "invalid")
        for a in data.arms:
            got = [arm_cell(a, f"{prefix}/{c}") for c in counts]
            rows.append([k, a.name, _cell_text(a, k)] + [fmt(g.value) if g else "—" for g in got])
    s.tables.append(Table(["metric", "arm", "win rate [95% CI]", "wins", "ties", "losses", "invalid"], rows))
    return s


def _curve_columns(rows: list[dict[str, Any]]) -> list[str]:
    numeric = {k for row in rows for k, v in row.items()
               if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    picked: list[str] = []
    for _, words in CURVE_GROUPS:
        picked += sorted(k for k in numeric if k not in picked and any(w in k.lower() for w in words))
    return picked[:MAX_PANELS]


def curves_section(data: ReportData) -> Section:
    s = Section("Training curves")
    stages = sorted({st for r in data.runs for st in r.train_logs})
    for st in stages:
        runs = [r for r in data.runs if st in r.train_logs]
        columns = _curve_columns([row for r in runs for row in r.train_logs[st]])
        if not columns:
            s.notes.append(f"Stage {st}: its train log has no reward, KL, length or loss column.")
            continue
        panels: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
        for col in columns:
            for r in runs:
                pts = [(float(row.get("step", i)), float(row[col])) for i, row in enumerate(r.train_logs[st])
                       if isinstance(row.get(col), (int, float)) and not isinstance(row.get(col), bool)]
                if pts:
                    panels.setdefault(col, {})[run_label(data, r)] = ([p[0] for p in pts], [p[1] for p in pts])
        s.figures.append(Figure(f"curves_{re.sub(r'[^A-Za-z0-9_]+', '_', st)}", line_panels(panels),
                                f"Stage {st}: {', '.join(columns)} over training steps"))
    unreadable = sorted({f"{r.name} ({', '.join(r.unreadable_logs)})" for r in data.runs if r.unreadable_logs})
    if unreadable:
        s.notes.append("Artifacts not found in the store (moved or deleted), so their train logs are not "
                       f"shown: {'; '.join(unreadable)}.")
    if not stages:
        s.notes.append("No training curves: no artifact of these runs has a train_log.jsonl (training "
                       "stages write one).")
    return s


def principles_section(data: ReportData) -> Section:
    found = sorted({m.group(1) for k in metric_keys(data) if (m := PRINCIPLE.match(k))})
    s = Section("Label agreement per principle")
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


def _cost(stage: dict[str, Any]) -> tuple[float, float, float, float]:
    c = stage.get("cost") or {}
    vals = [c.get("tokens_in", 0), c.get("tokens_out", 0), c.get("dollars", 0.0), stage.get("wall_time_s", 0.0)]
    return tuple(float(v) if isinstance(v, (int, float)) else 0.0 for v in vals)  # type: ignore[return-value]


def cost_section(data: ReportData) -> Section:
    s = Section("Cost", paragraphs=[
        "Tokens and dollars of model calls, from each stage's stage.json. 'Used' counts every "
        "artifact a run read (built earlier or by it); 'paid' only what the runs built themselves."])
    if not any(r.stages for r in data.runs):
        s.notes.append("No cost records: no stages/*.json in these runs.")
        return s
    rows, detail = [], []
    for arm in data.arms:
        used = [sum(_cost(st)[2] for st in r.stages.values()) for r in arm.runs]
        paid = [_cost(st) for r in arm.runs for st in r.stages.values() if not st.get("reused")]
        tokens = [sum(_cost(st)[i] for r in arm.runs for st in r.stages.values()) for i in (0, 1)]
        rows.append([arm.name, str(len(arm.runs)), fmt(tokens[0]), fmt(tokens[1]),
                     f"${sum(used) / len(used):.4f}", f"${sum(p[2] for p in paid):.4f}",
                     f"{sum(p[3] for p in paid):.1f}"])
        for r in arm.runs:
            for name, st in r.stages.items():
                ti, to, dollars, wall = _cost(st)
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
    runs_section, arms_section, win_rates_section, head_to_head_section, paired_tests_section, curves_section,
    principles_section, cost_section, constitution_section, config_section, artifacts_section,
)
