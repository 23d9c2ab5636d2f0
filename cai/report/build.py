"""``cai report PATH``: one run or a whole sweep -> ``report.md`` and a self-contained ``report.html``.

Read-only over what :mod:`cai.pipeline` wrote: each run directory's ``run.json`` (artifact key
per stage, resolved config, constitution hash, store root), ``metrics.json`` and
``stages/<stage>.json``, Hydra's ``.hydra/overrides.yaml`` when present, and the
``train_log.jsonl`` of any artifact in the store. It loads no model and changes nothing but the
report files.

``PATH`` is a run directory (it has ``run.json``) or any directory above run directories (a
Hydra sweep folder, or a folder of sweeps). Runs whose configs differ only in ``seed`` (and the
store location) are one **arm**; an arm's metric over several seeds is shown as the mean with a
Student-t 95% interval (:func:`cai.evaluate.seed_summary`), a single run's metric with the
interval its stage wrote (``<metric>_ci_low`` / ``<metric>_ci_high``), if any.

Sections (:mod:`cai.report.sections`): runs, arms (headline metrics with intervals; every
metric under a fold), win rates, head to head and paired tests between arms
(:mod:`cai.report.h2h`; the first from ``head_to_head.json``, written by ``cai compare``),
training curves, label agreement per principle, cost,
constitution, config differences, and artifacts: per stage, which runs share which artifact, by
arm and seed, and what makes keys differ (:mod:`cai.report.artifacts`). A section whose data no
run has yet says so in one line instead of being drawn empty. Rendering (Markdown, HTML, plots)
lives in :mod:`cai.report.render`.

Entry points: :func:`write_report` (``-> (md_path, html_path)``), :func:`main` (``cai report``),
and the Hydra callback :class:`cai.cli.ReportCallback`.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cai.errors import CaiError, DataError
from cai.report.render import Document, Section, render_html, render_markdown

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
ARMS_DIR = "arms"  # arms a run added beside itself (cai.pipeline.HUMAN_ARM_DIR)
TRAIN_LOG = "train_log.jsonl"
ARM_IGNORED = ("seed", "store.root")  # differences that do not make another arm
MAX_DEPTH = 3  # how deep below PATH to look for run directories
_MISSING = object()


@dataclass
class RunRecord:
    """Everything the report reads about one run directory."""

    dir: Path
    name: str  # path relative to the report's root ("0", "sweep_a/1"), or the folder's name
    info: dict[str, Any]  # run.json
    metrics: dict[str, float]  # numeric metrics only (NaN kept as NaN)
    stages: dict[str, dict[str, Any]]  # stage name -> stages/<stage>.json
    overrides: list[str] = field(default_factory=list)
    train_logs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    unreadable_logs: list[str] = field(default_factory=list)  # stages whose artifact could not be read

    @property
    def config(self) -> dict[str, Any]:
        return self.info.get("config") or {}

    @property
    def seed(self) -> Any:
        return self.info.get("seed", self.config.get("seed"))


@dataclass
class Arm:
    """Runs that differ only in seed: one arm of the comparison."""

    name: str
    runs: list[RunRecord]


@dataclass
class ReportData:
    root: Path
    runs: list[RunRecord]
    arms: list[Arm]
    varying: list[str]  # flattened config keys whose values differ between runs
    head_to_head: list[dict[str, Any]] | None = None  # rows of head_to_head.json (cai compare), if any


# --------------------------------------------------------------------------- reading
def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from e


def as_number(value: Any) -> float | None:
    """A metric value as a float ("NaN"/"Infinity" strings included); None if not numeric."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value in ("NaN", "Infinity", "-Infinity"):
        return float(value.replace("Infinity", "inf"))
    return None


def _natural_key(path: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.as_posix())]


def find_run_dirs(path: Path) -> list[Path]:
    """``path`` itself if it is a run directory, else run directories up to MAX_DEPTH below it;
    with each run, the arms it added (``<run>/arms/<name>/``, e.g. the human-label arm)."""
    if (path / RUN_FILE).is_file():
        found = [path]
    else:
        found = []
        frontier = [path]
        for _ in range(MAX_DEPTH):
            nxt = []
            for d in frontier:
                for child in sorted(d.iterdir()):
                    if not child.is_dir() or child.name.startswith("."):
                        continue
                    (found if (child / RUN_FILE).is_file() else nxt).append(child)
            frontier = nxt
    found += [arm.parent for run in list(found) for arm in sorted((run / ARMS_DIR).glob(f"*/{RUN_FILE}"))]
    return sorted(found, key=lambda p: _natural_key(p.relative_to(path)))


def _read_overrides(run_dir: Path) -> list[str]:
    file = run_dir / ".hydra" / "overrides.yaml"
    if not file.is_file():
        return []
    import yaml

    try:
        loaded = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise DataError(f"{file}: not valid YAML: {e}") from e
    return [str(x) for x in loaded] if isinstance(loaded, list) else []


def _read_train_logs(info: dict[str, Any]) -> tuple[dict[str, list[dict]], list[str]]:
    """Rows of every ``train_log.jsonl`` among the run's artifacts (read from the store)."""
    from cai.artifacts import ArtifactStore
    from cai.data import read_jsonl

    store_root = info.get("store")
    artifacts = info.get("artifacts") or {}
    if not store_root:
        return {}, sorted(artifacts)
    store = ArtifactStore(store_root)
    logs, unreadable = {}, []
    for stage, key in sorted(artifacts.items()):
        try:
            folder = store.path(key)
        except CaiError:
            unreadable.append(stage)
            continue
        if not folder.is_dir():
            unreadable.append(stage)
        elif (folder / TRAIN_LOG).is_file():
            logs[stage] = [r for r in read_jsonl(folder / TRAIN_LOG) if isinstance(r, dict)]
    return logs, unreadable


def load_run(run_dir: Path, root: Path) -> RunRecord:
    """Read one run directory (``run.json``, ``metrics.json``, ``stages/*.json``)."""
    info = _read_json(run_dir / RUN_FILE)
    if not isinstance(info, dict):
        raise DataError(f"{run_dir / RUN_FILE}: expected a JSON object as written by cai run")
    metrics_file = run_dir / "metrics.json"
    raw = _read_json(metrics_file) if metrics_file.is_file() else {}
    metrics = {k: v for k, v in ((k, as_number(v)) for k, v in raw.items()) if v is not None}
    stages = {}
    for f in sorted((run_dir / "stages").glob("*.json")):
        stages[f.stem] = _read_json(f)
    logs, unreadable = _read_train_logs(info)
    name = run_dir.name if run_dir == root else run_dir.relative_to(root).as_posix()
    return RunRecord(run_dir, name, info, metrics, stages, _read_overrides(run_dir), logs, unreadable)


# --------------------------------------------------------------------------- arms
def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    if not isinstance(config, dict):
        return {prefix: config} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def format_value(v: Any) -> str:
    if v is _MISSING:
        return "(absent)"
    if isinstance(v, str):
        return v
    return json.dumps(v, sort_keys=True)


def varying_keys(runs: list[RunRecord]) -> list[str]:
    flats = [flatten(r.config) for r in runs]
    keys = sorted(set().union(*flats)) if flats else []
    return [k for k in keys if len({format_value(f.get(k, _MISSING)) for f in flats}) > 1]


def group_arms(runs: list[RunRecord], varying: list[str]) -> list[Arm]:
    """Group runs by every varying config value except ``seed``/``store.root``."""
    arm_keys = [k for k in varying if k not in ARM_IGNORED]
    groups: dict[str, list[RunRecord]] = {}
    for r in runs:
        flat = flatten(r.config)
        label = ", ".join(f"{k}={format_value(flat.get(k, _MISSING))}" for k in arm_keys)
        groups.setdefault(label, []).append(r)
    if len(groups) == 1:
        only = next(iter(groups.values()))
        return [Arm(str(only[0].info.get("experiment") or "run"), only)]
    if ARM_TAG in arm_keys:  # an `arm` preset names its runs: show that, not every key it set
        return [Arm(_tagged_name(rs, groups, arm_keys), rs) for rs in groups.values()]
    return [Arm(name, rs) for name, rs in groups.items()]


ARM_TAG = "tags.arm"


def _tagged_name(runs: list[RunRecord], groups: dict[str, list[RunRecord]], arm_keys: list[str]) -> str:
    """``tags.arm=<tag>``, plus the keys that tell apart groups sharing that tag."""
    flat = flatten(runs[0].config)
    tag = flat.get(ARM_TAG, _MISSING)
    siblings = [flatten(g[0].config) for g in groups.values() if flatten(g[0].config).get(ARM_TAG, _MISSING) == tag]
    extra = [k for k in arm_keys if k != ARM_TAG
             and len({format_value(f.get(k, _MISSING)) for f in siblings}) > 1]
    name = f"{ARM_TAG}={format_value(tag)}"
    return name + (" (" + ", ".join(f"{k}={format_value(flat.get(k, _MISSING))}" for k in extra) + ")" if extra else "")


def collect(path: str | Path) -> ReportData:
    """Find and read every run under ``path``."""
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"cai report: {path}: no such directory (give a run directory or a sweep folder)")
    dirs = find_run_dirs(root)
    if not dirs:
        raise DataError(f"cai report: {path}: no run found (a run directory has {RUN_FILE}; looked "
                        f"{MAX_DEPTH} levels down)")
    runs = [load_run(d, root) for d in dirs]
    from cai.report.h2h import load_head_to_head

    varying = varying_keys(runs)
    return ReportData(root, runs, group_arms(runs, varying), varying, load_head_to_head(root))


# --------------------------------------------------------------------------- writing
def build_document(data: ReportData) -> Document:
    from cai.report.sections import SECTION_BUILDERS  # it reads this module's types

    experiments = sorted({str(r.info.get("experiment", "?")) for r in data.runs})
    summary = [
        f"source: {data.root}",
        f"experiment: {', '.join(experiments)}",
        f"{len(data.runs)} run(s) in {len(data.arms)} arm(s): "
        + "; ".join(f"{a.name} ({len(a.runs)} run{'s' if len(a.runs) != 1 else ''})" for a in data.arms),
    ]
    sections: list[Section] = [build(data) for build in SECTION_BUILDERS]
    return Document(f"cai report: {', '.join(experiments)}", summary, sections)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def write_report(path: str | Path, out_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``report.md`` (+ ``report_assets/*.png``) and ``report.html`` for the run(s) under
    ``path`` into ``out_dir`` (default: ``path``). Returns ``(md_path, html_path)``."""
    data = collect(path)
    out = Path(out_dir).expanduser() if out_dir is not None else data.root
    out.mkdir(parents=True, exist_ok=True)
    doc = build_document(data)
    md_text, assets = render_markdown(doc)
    assets_dir = out / "report_assets"
    if assets_dir.is_dir():  # drop figures of an earlier report that this one no longer has
        for old in assets_dir.glob("*.png"):
            if f"report_assets/{old.name}" not in assets:
                old.unlink()
    for rel, png in assets.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(out / rel, png)
    md_path, html_path = out / "report.md", out / "report.html"
    _write_atomic(md_path, md_text.encode("utf-8"))
    _write_atomic(html_path, render_html(doc).encode("utf-8"))
    log.info("report: %s, %s", md_path, html_path)
    return md_path, html_path


def main(argv: list[str] | None = None) -> int:
    """``cai report PATH [-o OUT_DIR]``; returns the exit status (2 on a user mistake)."""
    p = argparse.ArgumentParser(prog="cai report", description="Write report.md and report.html for a "
                                "run directory or a sweep folder (read-only over the runs).")
    p.add_argument("path", help="a run directory (with run.json) or a folder of runs (a sweep)")
    p.add_argument("-o", "--out", default=None, help="where to write the report (default: PATH)")
    args = p.parse_args(argv)
    try:
        md_path, html_path = write_report(args.path, args.out)
    except CaiError as e:
        print(f"cai: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {md_path}\nwrote {html_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

