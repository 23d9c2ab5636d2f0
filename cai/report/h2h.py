"""Report sections that compare arms with each other: head-to-head win rates and paired tests.

- **Head to head** reads ``head_to_head.json`` (written by ``cai compare``, :mod:`cai.evaluate.compare`,
  or by the sweep callback) -- the report itself never runs a judge. Per seed, a matrix arm x
  arm of win rates with their bootstrap intervals: the cell in row A, column B is how often A's
  response beat B's. The file holds one row per unordered pair (A over B); B over A is the same
  judgements seen from B: ``1 - win rate``, interval ``[1 - high, 1 - low]``. Over several
  seeds, each cell's mean with the Student-t interval the report uses for seeds.
- **Paired tests between arms** read each run's ``evaluate`` ``samples.jsonl`` from the store
  (read-only): per-prompt quantities measured on the same prompts -- the score against SFT
  (win 1, tie 0.5, loss 0; invalid answers left out), the KL to SFT, the response length, and
  the held-out RM score when the samples carry one -- and, for every pair of arms of one seed,
  :func:`cai.stats.paired_comparison`: the mean difference with a paired bootstrap interval
  and a sign-flip p-value. A quantity no run has is named as absent, not drawn empty.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from cai.errors import CaiError, DataError
from cai.report.render import Section, Table
from cai.report.runs import H2H_FILE
from cai.stats import OUTCOME_SCORE, paired_comparison, seed_summary

if TYPE_CHECKING:
    from cai.report.runs import ReportData, RunRecord

# (label, samples.jsonl field); "outcome" is turned into a score
QUANTITIES = (("score vs SFT", "outcome"), ("KL to SFT", "kl"), ("length (tokens)", "arm_tokens"),
              ("held-out RM score", "rm_score"))
N_PERM = 2000

Cell = tuple[float, float, float]  # value, ci low, ci high (NaN: none)


def _fmt(v: float) -> str:
    return "—" if not math.isfinite(v) else f"{v:.3g}"


def cell_text(c: Cell | None, seeds: int = 1) -> str:
    if c is None:
        return "—"
    s = _fmt(c[0])
    if math.isfinite(c[1]) and math.isfinite(c[2]):
        s += f" [{_fmt(c[1])}, {_fmt(c[2])}]"
    return s + (f" ({seeds} seeds)" if seeds > 1 else "")


def h2h_matrices(rows: Sequence[Mapping[str, Any]]) -> dict[Any, dict[tuple[str, str], Cell]]:
    """Per seed: (row arm, column arm) -> win rate of the row arm over the column arm, both
    directions filled from one row per pair (the reverse is 1 - rate, interval mirrored)."""
    out: dict[Any, dict[tuple[str, str], Cell]] = {}
    for r in rows:
        m = out.setdefault(r["seed"], {})
        w, lo, hi = float(r["win_rate"]), float(r["ci_low"]), float(r["ci_high"])
        m[(r["arm_a"], r["arm_b"])] = (w, lo, hi)
        m[(r["arm_b"], r["arm_a"])] = (1.0 - w, 1.0 - hi, 1.0 - lo)
    return out


def mean_matrix(matrices: Mapping[Any, Mapping[tuple[str, str], Cell]]) -> dict[tuple[str, str], tuple[Cell, int]]:
    """Each cell's mean over the seeds that have it, with a Student-t interval (NaN for one seed)."""
    values: dict[tuple[str, str], list[float]] = {}
    for m in matrices.values():
        for pair, c in m.items():
            if math.isfinite(c[0]):
                values.setdefault(pair, []).append(c[0])
    out = {}
    for pair, vs in values.items():
        s = seed_summary(vs)
        out[pair] = ((s.mean, s.ci_low, s.ci_high), s.n)
    return out


def _arm_order(data: ReportData, names: set[str]) -> list[str]:
    known = [a.name for a in data.arms if a.name in names]
    return known + sorted(names - set(known))


def _matrix_table(arms: list[str], cell: Any, caption: str) -> Table:
    rows = [[a] + ["—" if a == b else cell(a, b) for b in arms] for a in arms]
    return Table(["row beats column"] + arms, rows, caption=caption)


def head_to_head_section(data: ReportData) -> Section:
    s = Section("Head to head", paragraphs=[
        "Win rate of the row arm over the column arm, judged by the held-out judge in both orders (ties "
        "count half; invalid answers apart, never losses), with a 95% bootstrap interval over prompts. "
        "An arm is not compared with itself; column over row is 1 - row over column."])
    rows = getattr(data, "head_to_head", None)
    if rows is None:
        s.notes.append(f"No head-to-head comparison: no {H2H_FILE} here (run cai compare {data.root}; the "
                       "sweep callback does it when a sweep ends).")
        return s
    if not rows:
        s.notes.append(f"{H2H_FILE} compares no pair of arms: no seed has two arms with an evaluate artifact "
                       "(its 'skipped' list says why).")
        return s
    matrices = h2h_matrices(rows)
    arms = _arm_order(data, {r[k] for r in rows for k in ("arm_a", "arm_b")})
    counts = {(r["seed"], r["arm_a"], r["arm_b"]): r for r in rows}
    for seed in sorted(matrices, key=str):
        m = matrices[seed]
        s.tables.append(_matrix_table(arms, lambda a, b, m=m: cell_text(m.get((a, b))), f"Seed {seed}"))
    if len(matrices) > 1:
        mean = mean_matrix(matrices)
        s.tables.append(_matrix_table(arms, lambda a, b: cell_text(*mean[(a, b)]) if (a, b) in mean else "—",
                                      f"Mean over {len(matrices)} seeds, Student-t 95% interval"))
    s.details.append(Table(["seed", "arm A", "arm B", "A over B [95% CI]", "wins", "ties", "losses", "invalid", "n"],
                           [[str(k[0]), k[1], k[2], cell_text((r["win_rate"], r["ci_low"], r["ci_high"])),
                             str(r["wins"]), str(r["ties"]), str(r["losses"]), str(r["invalid"]), str(r["n"])]
                            for k, r in counts.items()], caption="Counts per pair"))
    return s


# --------------------------------------------------------------------------- paired tests
def per_prompt(rows: Sequence[Mapping[str, Any]], ties: str = "half") -> dict[str, dict[str, float]]:
    """Quantity label -> {prompt id: value} from one run's evaluate samples; quantities the rows
    do not carry are absent. Invalid judgements (and ties with ``ties="excluded"``) are left out."""
    out: dict[str, dict[str, float]] = {}
    for label, name in QUANTITIES:
        values: dict[str, float] = {}
        for r in rows:
            v = r.get(name)
            if name == "outcome":
                if v not in OUTCOME_SCORE or (v == "tie" and ties == "excluded"):
                    continue
                v = OUTCOME_SCORE[v]
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                values[str(r["prompt_id"])] = float(v)
        if values:
            out[label] = values
    return out


def paired_rows(arms: Mapping[str, Mapping[str, Mapping[str, float]]], *, n_boot: int, seed: int
                ) -> list[list[str]]:
    """One table row (arm A, arm B, quantity, diff [CI], p, n) per pair of arms and shared quantity."""
    names = list(arms)
    rows = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            for label, _ in QUANTITIES:
                if label not in arms[a] or label not in arms[b]:
                    continue
                try:
                    pc = paired_comparison(arms[a][label], arms[b][label], n_boot=n_boot, n_perm=N_PERM, seed=seed)
                except DataError:  # no prompt in common
                    continue
                rows.append([a, b, label, cell_text((pc.diff, pc.ci_low, pc.ci_high)), f"{pc.p_value:.3g}",
                             str(pc.n)])
    return rows


def _run_samples(run: RunRecord) -> list[dict[str, Any]] | None:
    from cai.artifacts import ArtifactStore
    from cai.data import read_jsonl
    from cai.report.runs import headline_evaluation

    found, root = headline_evaluation(run.info), run.info.get("store")
    key = found[1] if found else None
    if not key or not root:
        return None
    try:
        file = ArtifactStore(root).path(key) / "samples.jsonl"
    except CaiError:
        return None
    return [r for r in read_jsonl(file) if isinstance(r, dict) and "prompt_id" in r] if file.is_file() else None


def paired_tests_section(data: ReportData) -> Section:
    s = Section("Paired tests between arms", paragraphs=[
        "Arm A minus arm B on the same test prompts, per seed: mean difference [95% paired bootstrap "
        "interval] and a two-sided sign-flip p-value. Quantities from each run's evaluate samples."])
    by_seed: dict[Any, dict[str, dict[str, dict[str, float]]]] = {}
    boots: dict[Any, int] = {}
    missing: list[str] = []
    for arm in data.arms:
        for run in arm.runs:
            rows = _run_samples(run)
            if rows is None:
                missing.append(run.name)
                continue
            ecfg = run.config.get("eval") or {}
            by_seed.setdefault(run.seed, {}).setdefault(arm.name, per_prompt(rows, ecfg.get("ties", "half")))
            boots[run.seed] = int(ecfg.get("bootstrap_resamples", 2000))
    if missing:
        s.notes.append(f"No evaluate samples (not evaluated, or not in the store) for run(s): {', '.join(missing)}.")
    have = {label for arms in by_seed.values() for q in arms.values() for label in q}
    absent = [label for label, _ in QUANTITIES if label not in have]
    if absent:
        s.notes.append(f"Not in the evaluate samples, so not tested: {', '.join(absent)}.")
    for seed in sorted(by_seed, key=str):
        arms = by_seed[seed]
        seed_int = seed if isinstance(seed, int) else 0
        rows = paired_rows(arms, n_boot=boots[seed], seed=seed_int) if len(arms) > 1 else []
        if rows:
            s.tables.append(Table(["arm A", "arm B", "quantity", "A - B [95% CI]", "p", "n"], rows,
                                  caption=f"Seed {seed}"))
    if not s.tables:
        s.notes.append("No pair of arms with evaluate samples on one seed.")
    return s
