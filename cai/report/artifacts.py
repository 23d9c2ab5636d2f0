"""The report's *Artifacts* section: which runs share which artifact, so matching is verified.

Every stage's output is content-addressed (:mod:`cai.artifacts`): two runs that built a stage
from the same config and the same upstream artifacts have the same key in their ``run.json``
and used one artifact. A sweep's claim that its arms are matched -- the same prompts, the same
pairs, the same baseline samples -- is therefore checkable, and this section checks it: one
row per stage saying which runs share an artifact, by arm (named as elsewhere in the report,
by ``tags.arm`` when the arm presets set it) and seed (the run's ``seed``), with short keys;
and, where keys differ, what differs in the ``stages/<stage>.json`` of those runs (config
fields, inputs, constitution, code version). In a multi-seed sweep almost nothing is shared by
*all* runs, so the rows group by seed: "all arms: one per seed", "rlaif, dpo_ai: one per seed",
"none: each of the 16 runs has its own". A folded table lists every full key and its runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from cai.report.render import Section, Table

if TYPE_CHECKING:
    from cai.report.runs import ReportData, RunRecord


@dataclass(frozen=True)
class _Use:
    """One run's artifact of one stage."""

    run: RunRecord
    arm: str  # the arm's name as the report shows it, without a leading "tags.arm="
    seed: str
    key: str


def short_key(key: str) -> str:
    """The first 10 hex digits of a key's digest (the stage name is the row's)."""
    return key.rsplit("-", 1)[-1][:10] + "…"


def _uses(data: ReportData, stage: str) -> list[_Use]:
    from cai.report.runs import ARM_TAG

    arm_of = {id(r): a.name.removeprefix(f"{ARM_TAG}=") for a in data.arms for r in a.runs}
    return [_Use(r, arm_of[id(r)], str(r.seed), k) for r in data.runs
            if (k := (r.info.get("artifacts") or {}).get(stage))]


def _ordered(values: list[str]) -> list[str]:
    return list(dict.fromkeys(values))


def _seeds_text(seeds: list[str]) -> str:
    return f"seed {seeds[0]}" if len(seeds) == 1 else "seeds " + ", ".join(seeds)


def _one_group(key: str, seeds: list[str], all_seeds: list[str]) -> str:
    if len(all_seeds) < 2:
        return f"one artifact ({short_key(key)})"
    where = "all seeds" if set(seeds) == set(all_seeds) else _seeds_text(seeds)
    return f"one artifact for {where} ({short_key(key)})"


def _sharing(data: ReportData, uses: list[_Use]) -> str:
    """Which runs share which artifact of one stage, in a line (arms and seeds, short keys)."""
    groups: dict[str, list[_Use]] = {}
    for u in uses:
        groups.setdefault(u.key, []).append(u)
    if len(groups) == 1:
        key = next(iter(groups))
        if len(uses) == len(data.runs):
            return f"one artifact for all {len(uses)} runs ({short_key(key)})"
        if len(uses) == 1:
            seed = f", seed {uses[0].seed}" if len({r.seed for r in data.runs}) > 1 else ""
            return f"only {uses[0].arm}{seed} uses it ({short_key(key)})"
        return (f"one artifact for the {len(uses)} runs that use it: "
                f"{', '.join(_ordered([u.arm for u in uses]))} ({short_key(key)})")
    all_arms, all_seeds = [a.name for a in data.arms], _ordered([u.seed for u in uses])
    if all(len(g) == 1 for g in groups.values()):
        arms = _ordered([u.arm for u in uses])
        who = [] if len(all_arms) < 2 else ["all arms" if len(arms) == len(all_arms) else ", ".join(arms)]
        return f"none: one per run ({'; '.join(who + [_seeds_text(all_seeds)])})"
    by_arms: dict[tuple[str, ...], list[tuple[str, list[str]]]] = {}
    for key, g in groups.items():
        by_arms.setdefault(tuple(_ordered([u.arm for u in g])), []).append((key, _ordered([u.seed for u in g])))
    parts = []
    for arms, items in by_arms.items():
        who = "" if len(all_arms) < 2 else ("all arms" if len(arms) == len(all_arms) else ", ".join(arms))
        if len(items) == 1:
            what = _one_group(items[0][0], items[0][1], all_seeds)
        elif all(len(seeds) == 1 for _, seeds in items) and len({seeds[0] for _, seeds in items}) == len(items):
            what = "one per seed (" + ", ".join(f"{seeds[0]}: {short_key(k)}" for k, seeds in items) + ")"
        else:
            what = f"{len(items)} artifacts (" + "; ".join(f"{_seeds_text(seeds)}: {short_key(k)}"
                                                           for k, seeds in items) + ")"
        parts.append(f"{who}: {what}" if who else what)
    return "; ".join(parts)


def _differences(stage: str, uses: list[_Use], max_items: int = 5) -> str:
    """What differs between the stage.json of one run per artifact: config fields, inputs."""
    from cai.report.runs import flatten, format_value

    firsts = list({u.key: u for u in reversed(uses)}.values())
    if len({u.key for u in uses}) < 2:
        return "—"
    infos = [u.run.stages.get(stage) for u in firsts]
    if any(not isinstance(i, dict) for i in infos):
        return "(a run has no stages/" + stage + ".json)"
    found = []
    flats = [flatten(i.get("config") or {}) for i in infos]
    names = sorted(set().union(*flats))
    # fields every run's config has, with different values, come first; then fields only some have
    changed = [k for k in names if all(k in f for f in flats) and len({format_value(f[k]) for f in flats}) > 1]
    partial = [k for k in names if not all(k in f for f in flats)]
    inputs = [n for n in sorted(set().union(*[i.get("inputs") or {} for i in infos]))
              if len({(i.get("inputs") or {}).get(n) for i in infos}) > 1]
    if changed or partial:
        text = ", ".join(changed[:max_items]) + (" …" if len(changed) > max_items else "")
        if partial:
            text += (" + " if changed else "") + f"{len(partial)} field(s) only some have ({partial[0]}, …)"
        found.append("config: " + text)
    if inputs:
        found.append("inputs: " + ", ".join(inputs[:max_items]) + (" …" if len(inputs) > max_items else ""))
    found += [what for what in ("constitution", "version") if len({str(i.get(what)) for i in infos}) > 1]
    return "; ".join(found) or "—"


def _pipeline_order(data: ReportData, stages: list[str]) -> list[str]:
    """Upstream stages first (depth in the input graph of the runs' stage.json), then by name."""
    deps: dict[str, set[str]] = {st: set() for st in stages}
    for r in data.runs:
        for st, info in r.stages.items():
            if st in deps and isinstance(info, dict):
                deps[st] |= {str(k).rsplit("-", 1)[0] for k in (info.get("inputs") or {}).values()} & set(deps)
    depth = dict.fromkeys(stages, 0)
    for _ in stages:  # longest path from a source; the graph is acyclic, the bound keeps it finite anyway
        for st in stages:
            depth[st] = max([0] + [depth[d] + 1 for d in deps[st] if d != st])
    return sorted(stages, key=lambda st: (depth[st], st))


def _run_text(data: ReportData, use: _Use) -> str:
    """A run in the key list: its folder, arm and seed."""
    arm = f"{use.arm}, " if len(data.arms) > 1 else ""
    return f"{use.run.name} ({arm}seed {use.seed})"


def artifacts_section(data: ReportData) -> Section:
    s = Section("Artifacts")
    stages: list[str] = []
    for r in data.runs:
        stages += [st for st in (r.info.get("artifacts") or {}) if st not in stages]
    if not stages:
        s.notes.append("No artifact keys in run.json.")
        return s
    stages = _pipeline_order(data, stages)
    if len(data.runs) == 1:
        keys = data.runs[0].info.get("artifacts") or {}
        s.tables.append(Table(["stage", "artifact key"], [[st, keys.get(st) or "—"] for st in stages]))
        return s
    uses = {st: _uses(data, st) for st in stages}
    shared = [st for st in stages if len(uses[st]) == len(data.runs) and len({u.key for u in uses[st]}) == 1]
    s.paragraphs.append(
        f"{len(shared)} of {len(stages)} stages are the same artifact in all {len(data.runs)} runs (same key in "
        "every run.json). Per stage: which runs share one artifact, by arm and seed (keys: the first 10 hex "
        "digits), and what differs in the stage.json of runs whose keys differ: matching is verified, not assumed.")
    rows = [[st, str(len(uses[st])), str(len({u.key for u in uses[st]})), _sharing(data, uses[st]),
             _differences(st, uses[st])] for st in stages]
    s.tables.append(Table(["stage", "runs", "artifacts", "shared", "keys differ in"], rows))
    detail = []
    for st in stages:
        groups: dict[str, list[_Use]] = {}
        for u in uses[st]:
            groups.setdefault(u.key, []).append(u)
        for key, g in groups.items():
            runs = f"all {len(g)} runs" if len(g) == len(data.runs) else ", ".join(_run_text(data, u) for u in g)
            detail.append([st, key, runs])
    s.details.append(Table(["stage", "artifact key", "runs"], detail,
                           caption="Every artifact and the runs that use it"))
    return s
